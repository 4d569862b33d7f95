"""Isolation: one method in a child process, with a wall-clock cap.

With a cap (``Settings.method_timeout_s``, ``--method-timeout``; 600 s in ``--full``
mode, off in quick mode): each method then runs in its own child process (``spawn``,
in a new session so that its compile workers can be killed with it), which rebuilds the
problem from the config's seed (checked bitwise against the parent's by a digest),
receives the float64 reference, the tolerance and the parent's torch thread count, and
runs the same ``run_method``. It reports its stages ("ready", first call done, warm-up
done) to the parent through a pipe. If no result arrives within the cap (wall clock from
the child's start: process start and problem building included) the child and its
process group are killed and the row says "timed out" with how far it got; a child that
dies without a result is "failed" with its exit code. Neither gets a speedup. The peak
memory of an isolated method is measured in that fresh process.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import pickle
import signal
import time
import traceback

import torch

from fastmaml.bench import peers
from fastmaml.bench.configs import Config
from fastmaml.bench.runner import Row, Settings, make_problem, problem_digest, run_method


def _child(conn, cfg: Config, method: str, s: Settings, ref_bytes: bytes | None, tol_rel: float | None,
           threads: int) -> None:
    """Entry point of the child process (spawned): rebuild the problem, run the method,
    send the stages and the Row to the parent through ``conn``."""
    try:
        os.setsid()  # its own process group: the parent kills the child with its compile workers
    except OSError:
        pass
    try:  # Linux: die with the parent (SIGKILL when the parent goes)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    try:
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        problem = make_problem(cfg, s)
        ref = None
        if ref_bytes is not None:
            ref = [r.to(s.device) for r in torch.load(io.BytesIO(ref_bytes), weights_only=True)]
        conn.send(("ready", dict(digest=problem_digest(problem), setup_s=time.perf_counter() - t0,
                                 threads=torch.get_num_threads())))
        row = run_method(method, problem, s, ref, tol_rel, lambda stage, d: conn.send((stage, d)))
        try:
            pickle.dumps(row)
        except Exception:  # noqa: BLE001 - an unpicklable info value from a peer: send its text
            row.info = {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                        for k, v in row.info.items()}
        conn.send(("row", row))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed row
        conn.send(("error", f"{type(exc).__name__}: {exc}"[:300] + "\n" + traceback.format_exc(limit=6)[-3000:]))
    finally:
        conn.close()


def _kill_group(proc) -> None:
    """SIGKILL the child's process group (it called setsid, so the group id is its pid),
    the child itself (in case it had not got that far), and reap it."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill,
                 lambda: os.killpg(proc.pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    proc.join(10)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = "; the OOM killer sends SIGKILL" if -code == signal.SIGKILL else ""
        return f"the child process was killed by {name}{extra} before sending a result"
    return f"the child process exited with code {code} without a result"


def run_isolated(cfg: Config, method: str, s: Settings, ref: list[torch.Tensor] | None, tol_rel: float | None,
                 digest: str) -> Row:
    """``run_method`` in a spawned child process, killed after ``s.method_timeout_s`` seconds
    (wall clock from its start). The row's memory figure is measured in that fresh process;
    ``info`` gets the cap, the wall time, when each stage was reached, the exit code."""
    cap = float(s.method_timeout_s)  # type: ignore[arg-type]
    ref_bytes = None
    if ref is not None:
        buf = io.BytesIO()
        torch.save([r.detach().cpu() for r in ref], buf)
        ref_bytes = buf.getvalue()
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, cfg, method, s, ref_bytes, tol_rel, torch.get_num_threads()),
                       name=f"fastmaml-bench {method}")
    t0 = time.perf_counter()
    proc.start()
    send.close()  # the child holds the write end; its exit gives EOF here
    stages: dict[str, tuple[float, dict]] = {}
    row: Row | None = None
    error = ""
    timed_out = False
    try:
        while True:
            left = cap - (time.perf_counter() - t0)
            if left <= 0:
                timed_out = True
                break
            if not recv.poll(min(left, 1.0)):
                continue
            try:
                kind, data = recv.recv()
            except (EOFError, OSError):  # the child died
                break
            if kind == "row":
                row = data
                break
            if kind == "error":
                error = data
                break
            stages[kind] = (time.perf_counter() - t0, data)
            if kind == "ready" and data["digest"] != digest:
                error = ("the child's rebuilt problem differs from the parent's (weights or batches not bitwise "
                         "equal)")
                break
    finally:
        wall = time.perf_counter() - t0
        if row is not None and not error:
            proc.join(30)  # a normal exit
        _kill_group(proc)
        recv.close()
    if row is None:
        row = Row(method, peers.METHODS.get(method, method))
        first, warm = stages.get("first", (0.0, None))[1], stages.get("warmup", (0.0, None))[1]
        for k, v in {**(first or {}), **(warm or {})}.items():
            setattr(row, k, v)
        if timed_out:
            row.status = "timed out"
            if "ready" not in stages:
                how = "process start and problem building not finished"
            elif first is None:
                how = "first call, compile included, not finished"
            elif warm is None:
                how = f"first call took {row.first_s:.3g} s; warm-up not finished"
            else:
                how = f"first call took {row.first_s:.3g} s; timed repetitions not finished"
            row.reason = f"no result within {cap:g} s ({how})"
        else:
            row.status = "failed"
            row.reason = error.split("\n", 1)[0] if error else _exit_reason(proc.exitcode)
            if "\n" in error:
                row.info["traceback"] = error.split("\n", 1)[1]
    ready = stages.get("ready", (None, {}))
    row.info.update(isolated=True, timeout_s=cap, wall_s=wall, exit_code=proc.exitcode, pid=proc.pid,
                    stages_s={k: v[0] for k, v in stages.items()})
    if ready[0] is not None:
        row.info.update(child_setup_s=ready[1]["setup_s"], threads=ready[1]["threads"],
                        problem_sha256=ready[1]["digest"])
    return row
