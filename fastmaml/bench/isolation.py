"""Isolation: one method in a child process, with a wall-clock cap.

With a cap (``Settings.method_timeout_s``, ``--method-timeout``; 600 s in ``--full``
mode, off in quick mode): each method then runs in its own child process (``spawn``,
in a new session so that its compile workers can be killed with it), which rebuilds the
problem from the config's seed (checked bitwise against the parent's by a digest),
receives the float64 reference, the tolerance and the parent's torch thread count, and
runs the same stages as in-process (``runner.start_method``, ``time_round``,
``finish_method``). It reports its stages ("ready", first call done, warm-up done) to
the parent through a pipe, then waits for the parent's commands: one round of timed
calls at a time, so that the parent can interleave the rounds of every method of a
configuration (each method's child stays alive, idle, between its rounds). Each stage
has the cap: preparation from the child's start (process start and problem building
included) to the end of its warm-up, and each round from its command to its answer. A
stage over the cap gets the child and its process group killed and the row "timed out"
with how far it got (the rounds it finished are kept in ``times_s``, without a median);
a child that dies without a result is "failed" with its exit code. Neither gets a
speedup. The peak memory of an isolated method is measured in that fresh process.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import pickle
import signal
import statistics
import time
import traceback

import torch

from fastmaml.bench import measure, peers
from fastmaml.bench.configs import Config
from fastmaml.bench.runner import (Row, Settings, finish_method, make_problem, problem_digest, start_method,
                                   time_round)


def _child(conn, cfg: Config, method: str, s: Settings, ref_bytes: bytes | None, tol_rel: float | None,
           threads: int) -> None:
    """Entry point of the child process (spawned): rebuild the problem, prepare the method
    (stages "ready", "first", "warmup" go to the parent), then answer the parent's
    ``("round", r)`` commands with that round's calls, and ``("finish",)`` with the Row."""
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
        row, live = start_method(method, problem, s, ref, tol_rel, lambda stage, d: conn.send((stage, d)))
        while live is not None:
            cmd = conn.recv()
            if cmd[0] != "round":
                break
            n0 = len(row.times_s)
            ok = time_round(row, live, problem, s)
            measure.malloc_trim()  # idle between rounds: give freed heap back (outside the timing)
            conn.send(("round", dict(times_s=row.times_s[n0:], ok=ok, status=row.status, reason=row.reason)))
            if not ok:
                break
        row = finish_method(row, live, cfg)
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


class Isolated:
    """One method in its capped child process, driven by the parent in stages:
    ``prepare()`` (start, checked first call, warm-up), ``round(r)`` (one round of timed
    calls; the parent calls every method's round r before any round r+1), ``finish()``
    (the Row). Each stage must answer within ``s.method_timeout_s`` seconds, or the child
    and its process group are killed and the row says "timed out" and how far it got."""

    def __init__(self, cfg: Config, method: str, s: Settings, ref: list[torch.Tensor] | None,
                 tol_rel: float | None, digest: str):
        self.cfg, self.method, self.s, self.digest = cfg, method, s, digest
        self.cap = float(s.method_timeout_s)  # type: ignore[arg-type]
        ref_bytes = None
        if ref is not None:
            buf = io.BytesIO()
            torch.save([r.detach().cpu() for r in ref], buf)
            ref_bytes = buf.getvalue()
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child, name=f"fastmaml-bench {method}",
                                args=(child_end, cfg, method, s, ref_bytes, tol_rel, torch.get_num_threads()))
        self.t0 = time.perf_counter()
        self.proc.start()
        child_end.close()  # the child holds its end; its exit gives EOF here
        self.stages: dict[str, tuple[float, dict]] = {}
        self.rounds: list[list[float]] = []
        self.rounds_s: list[float] = []
        self.row: Row | None = None  # the final row, once the child is done
        self.error = ""
        self.timed_out = ""  # the stage not finished within the cap

    @property
    def done(self) -> bool:
        return self.row is not None

    def _wait(self, stage: str, until: tuple[str, ...], t_start: float | None = None) -> tuple[str, object] | None:
        """Messages until one of ``until`` (returned) within the cap from ``t_start`` (default:
        now); None: the child is gone, or timed out (``self.timed_out`` says in which stage)."""
        t_start = time.perf_counter() if t_start is None else t_start
        while True:
            left = self.cap - (time.perf_counter() - t_start)
            if left <= 0:
                self.timed_out = stage
                return None
            if not self.conn.poll(min(left, 1.0)):
                continue
            try:
                kind, data = self.conn.recv()
            except (EOFError, OSError):  # the child died
                return None
            if kind in until:
                return kind, data
            if kind == "error":
                self.error = data
                return None
            self.stages[kind] = (time.perf_counter() - self.t0, data)
            if kind == "ready" and data["digest"] != self.digest:
                self.error = ("the child's rebuilt problem differs from the parent's (weights or batches not "
                              "bitwise equal)")
                return None

    def prepare(self) -> None:
        got = self._wait("prepare", ("warmup", "row"), self.t0)  # the cap counts from the child's start
        if got is None:
            self._end()
        elif got[0] == "warmup":
            self.stages["warmup"] = (time.perf_counter() - self.t0, got[1])  # type: ignore[assignment]
        else:
            self._end(got[1])  # type: ignore[arg-type]

    def round(self, r: int) -> None:
        if self.done:
            return
        t = time.perf_counter()
        try:
            self.conn.send(("round", r))
        except (OSError, BrokenPipeError):
            self._end()
            return
        got = self._wait(f"round {r + 1} of {self.s.rounds} of the timed repetitions", ("round",))
        if got is None:
            self._end()
            return
        self.rounds.append(got[1]["times_s"])  # type: ignore[index]
        self.rounds_s.append(time.perf_counter() - t)
        if not got[1]["ok"]:  # type: ignore[index]
            self.finish()

    def finish(self) -> Row:
        if not self.done:
            try:
                self.conn.send(("finish",))
                got = self._wait("the final report", ("row",))
            except (OSError, BrokenPipeError):
                got = None
            self._end(got[1] if got is not None else None)  # type: ignore[arg-type]
        return self.row  # type: ignore[return-value]

    def kill(self) -> None:
        """Kill the child and its process group now (the parent is stopping)."""
        _kill_group(self.proc)

    def _end(self, row: Row | None = None) -> None:
        wall = time.perf_counter() - self.t0
        if row is not None and not self.error:
            self.proc.join(30)  # a normal exit
        _kill_group(self.proc)
        self.conn.close()
        if row is None:
            row = self._partial_row()
        ready = self.stages.get("ready", (None, {}))
        row.info.update(isolated=True, timeout_s=self.cap, wall_s=wall, exit_code=self.proc.exitcode,
                        pid=self.proc.pid, stages_s={k: v[0] for k, v in self.stages.items()})
        if self.rounds_s:
            row.info["rounds_s"] = self.rounds_s
        if ready[0] is not None:
            row.info.update(child_setup_s=ready[1]["setup_s"], threads=ready[1]["threads"],
                            problem_sha256=ready[1]["digest"])
        self.row = row

    def _partial_row(self) -> Row:
        """The row of a child that gave no Row: what its stages and finished rounds said."""
        row = Row(self.method, peers.METHODS.get(self.method, self.method))
        first, warm = self.stages.get("first", (0.0, None))[1], self.stages.get("warmup", (0.0, None))[1]
        for k, v in {**(first or {}), **(warm or {})}.items():
            setattr(row, k, v)
        for ts in self.rounds:  # kept for the record; no median, no speedup
            row.times_s += ts
            if ts:
                row.round_medians_s.append(statistics.median(ts))
        if self.timed_out:
            row.status = "timed out"
            if "ready" not in self.stages:
                how = "process start and problem building not finished"
            elif first is None:
                how = "first call, compile included, not finished"
            elif warm is None:
                how = f"first call took {row.first_s:.3g} s; warm-up not finished"
            else:  # a round of timed repetitions (or the final report)
                how = f"first call took {row.first_s:.3g} s; {self.timed_out} not finished"
            row.reason = f"no result within {self.cap:g} s ({how})"
        else:
            row.status = "failed"
            row.reason = self.error.split("\n", 1)[0] if self.error else _exit_reason(self.proc.exitcode)
            if "\n" in self.error:
                row.info["traceback"] = self.error.split("\n", 1)[1]
        return row


def run_isolated(cfg: Config, method: str, s: Settings, ref: list[torch.Tensor] | None, tol_rel: float | None,
                 digest: str) -> Row:
    """One method alone in its capped child process: prepare, ``s.rounds`` rounds, finish."""
    m = Isolated(cfg, method, s, ref, tol_rel, digest)
    m.prepare()
    for r in range(s.rounds):
        m.round(r)
    return m.finish()
