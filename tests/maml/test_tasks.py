"""The task mapping (fastmaml.maml.tasks): module replicas per worker thread, the
task-thread rule, grad mode and errors carried into the workers, the pool's thread
settings."""

from __future__ import annotations

import pytest
import torch

from fastmaml.maml import functional, tasks
from tests.maml.cases import F64, conv_case, module_fn, module_params, one_thread

_conv_case = conv_case
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def test_module_fn_gives_each_thread_its_own_replica():
    """functional_call swaps parameters on the module while it runs: two threads on one
    module would see each other's weights. module_fn's workers use replicas that share
    the tensors (nothing copied) and stay off the caller's module."""
    import threading

    model, _ = _conv_case()
    fn = tasks.module_fn(model)
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    params = [{n: p + 0.1 * i for n, p in module_params(model).items()} for i in range(8)]
    want = [torch.func.functional_call(model, p, (x,)) for p in params]
    got = tasks.run_tasks(lambda i: fn(params[i], x), 8, 2)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    seen = []
    t = threading.Thread(target=lambda: seen.append(fn(params[0], x)))
    t.start()
    t.join()
    torch.testing.assert_close(seen[0], want[0], rtol=0, atol=1e-12)
    for p, q in zip(model.parameters(), module_params(model).values()):
        assert torch.equal(p.detach(), q)  # the caller's module is left as it was

    # a module that cannot be deep-copied (holds a lock) is shared, one call at a time
    import threading as _th

    model.lock = _th.Lock()
    fn2 = tasks.module_fn(model)
    got = tasks.run_tasks(lambda i: fn2(params[i], x), 8, 2)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_task_threads_rule_and_bad_values():
    model, data = _conv_case()
    safe, plain = tasks.module_fn(model), module_fn(model)
    xs, xq = data[0], data[2]
    n = torch.get_num_threads()
    assert tasks.choose_workers("auto", "loop", safe, xs, xq) == min(n, xs.shape[0])
    assert tasks.choose_workers("auto", "loop", plain, xs, xq) == 1  # not declared thread-safe
    assert tasks.choose_workers("auto", "vmap", safe, xs, xq) == 1
    assert tasks.choose_workers(3, "loop", plain, xs, xq) == 3  # an int declares it safe
    big = torch.zeros(2, 1, tasks.SMALL_TASK_INPUT + 1)
    assert tasks.choose_workers("auto", "loop", safe, big, big) == 1  # large per-task inputs: serial
    params = module_params(model)
    for bad in (0, -1, "2", True, 1.5):
        with pytest.raises(ValueError, match=r"task_threads must be 'auto' or a positive int, got"):
            functional.maml_loss(safe, params, 0.1, *data, steps=1, loss="cross_entropy", task_threads=bad)
    for bad in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"graph_memory_mb must be a finite number >= 0, got"):
            functional.maml_loss(safe, params, 0.1, *data, steps=1, loss="cross_entropy", graph_memory_mb=bad)


def test_run_tasks_carries_grad_mode_and_errors():
    with torch.no_grad():
        assert tasks.run_tasks(lambda t: torch.is_grad_enabled(), 4, 2) == [False] * 4
    assert tasks.run_tasks(lambda t: torch.is_grad_enabled(), 4, 2) == [True] * 4

    def boom(t):
        if t == 2:
            raise KeyError("task 2")
        return t

    with pytest.raises(KeyError, match="task 2"):
        tasks.run_tasks(boom, 4, 2)


def test_task_pool_keeps_the_callers_thread_setting():
    """Workers run one intra-op thread each; the caller's setting, and the one new
    threads start from, are left as they were."""
    import threading

    n = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1 (this module's setting), so a leaked worker setting shows
    try:
        tasks.task_pool(1)
        tasks.task_pool(3)  # a new pool (its size changed): its workers set themselves to 1 thread
        assert tasks.run_tasks(lambda t: torch.get_num_threads(), 3, 3) == [1, 1, 1]
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(n)
