"""``python -m fastmaml.train --algo maml|imaml|reptile`` on synthetic Omniglot for a
few iterations: the loss is finite, log and checkpoint are written, θ moved, the
algorithm's options are in the saved configuration; and the flags' errors. Accuracy is
not asserted at this size."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastmaml
from fastmaml.train import CONFIGS, algos
from fastmaml.train.__main__ import main
from fastmaml.train.loop import make_model

COMMON = ["--config", "omniglot-5w1s", "--synthetic", "--iterations", "2", "--meta-batch", "2", "--val-every", "2",
          "--val-episodes", "2", "--test-episodes", "2", "--test-steps", "1", "--log-every", "1", "--no-progress",
          "--device", "cpu"]


def _initial() -> dict[str, torch.Tensor]:
    cfg = CONFIGS["omniglot-5w1s"]
    torch.manual_seed(cfg.seed)
    return {f"model.{k}": v.detach().clone() for k, v in make_model(cfg).state_dict().items()}


@pytest.mark.parametrize("algo, extra, module", [
    ("maml", [], fastmaml.MAML),
    ("imaml", ["--lam", "1.5", "--cg-steps", "3"], fastmaml.iMAML),
    ("reptile", ["--outer-optimizer", "sgd", "--meta-lr", "0.5"], fastmaml.Reptile),
])
def test_algo_trains_and_writes_its_run(tmp_path, algo, extra, module):
    out = tmp_path / algo
    log = main([*COMMON, "--algo", algo, *extra, "--out", str(out)])
    saved = json.loads((out / "log.json").read_text())
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["config"]["algo"] == algo and ck["config"]["algo"] == algo and ck["iteration"] == 2
    train = saved["history"]["train"]
    assert [r["iteration"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert all(r["loss"] > 0 for r in train)  # cross-entropy: never exactly 0 here
    assert [v["iteration"] for v in saved["history"]["val"]] == [2]
    assert log["test"]["metric"] == "accuracy" and log["test"]["n"] == 2 and 0 <= log["test"]["mean"] <= 1
    init = _initial()
    assert set(ck["model"]) == set(init)
    moved = [k for k in init if not torch.equal(ck["model"][k], init[k])]
    assert len(moved) == len(init), f"unchanged after 2 meta-steps: {sorted(set(init) - set(moved))}"
    if algo == "imaml":
        assert (saved["config"]["lam"], saved["config"]["cg_steps"]) == (1.5, 3)
    if algo == "reptile":
        assert saved["config"]["outer_optimizer"] == "sgd" and saved["config"]["meta_lr"] == 0.5
    assert isinstance(algos.build(algo, make_model(CONFIGS["omniglot-5w1s"]), CONFIGS["omniglot-5w1s"]), module)


def test_reptile_meta_step_is_sgd_on_the_direction():
    """One plain-Reptile step by the loop's pieces: θ ← θ − ε (θ − mean_t φ_t) exactly."""
    cfg = CONFIGS["sinusoid"].override(algo="reptile", outer_optimizer="sgd", meta_lr=0.5, inner_steps=2)
    torch.manual_seed(0)
    model = make_model(cfg).double()
    module = algos.build("reptile", model, cfg)
    from fastmaml.train.loop import make_optimizer

    opt = make_optimizer(module, cfg)
    g = torch.Generator().manual_seed(0)
    xs, ys, xq, yq = (torch.randn(3, 10, 1, generator=g, dtype=torch.float64) for _ in range(4))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = module.adapt(xs, ys)
    opt.zero_grad(set_to_none=True)
    loss = algos.meta_step(module, (xs, ys, xq, yq))
    assert loss.dim() == 0 and not loss.requires_grad and math.isfinite(float(loss))
    opt.step()
    for n, p in model.named_parameters():
        want = theta[n] - 0.5 * (theta[n] - phi[f"{n}"].mean(0))
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-12)


def test_algo_flag_errors(tmp_path, capsys):
    for argv, msg in ((["--algo", "maml", "--lam", "2"], "--lam applies to --algo imaml only, got --algo maml"),
                      (["--cg-steps", "4"], "--cg-steps applies to --algo imaml only, got --algo maml"),
                      (["--algo", "reptile", "--first-order"], "--first-order applies to --algo maml or fomaml"),
                      (["--algo", "imaml", "--lam", "-1"], "--lam must be a finite float > 0, got -1.0"),
                      (["--algo", "imaml", "--cg-steps", "0"], "--cg-steps must be >= 1, got 0"),
                      (["--outer-optimizer", "rmsprop"], "invalid choice: 'rmsprop'")):
        with pytest.raises(SystemExit):
            main(["--config", "sinusoid", "--out", str(tmp_path), *argv])
        assert msg in capsys.readouterr().err, argv
    from fastmaml.train.loop import make_optimizer

    with pytest.raises(ValueError, match="outer_optimizer must be 'adam' or 'sgd', got 'lbfgs'"):
        make_optimizer(torch.nn.Linear(1, 1), CONFIGS["sinusoid"].override(outer_optimizer="lbfgs"))
