"""``--load``: a CPU-bound competitor process running during the measurements.

The competitor is a child process (``python -m fastmaml.bench.load``) that multiplies two
256×256 float32 matrices with ``torch.mm`` on ONE thread (``torch.set_num_threads(1)``,
``OMP_NUM_THREADS=MKL_NUM_THREADS=1``) in an endless loop: it keeps one core busy, the way
a second training job or a data loader does on a shared machine. ``Competitor`` starts it
(waits until its loop runs, then up to ``settle_s`` until the load average shows it), and
stops it: SIGTERM, then SIGKILL to its process group
after 5 s. ``python -m fastmaml.bench --load`` starts it after measuring the idle sgemm
rate and stops it after the last measurement, in a ``finally`` (an error, Ctrl-C). If the
benchmark process itself is killed, the competitor gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``, Linux) and otherwise leaves its loop within ~50 ms of seeing its
parent gone; it also stops after ``--seconds`` (default one day).

``stop()`` returns what the JSON records: the pid, the wall time, the CPU seconds the
competitor used (``/proc/<pid>/stat``) and its busy fraction (CPU / wall; about 1 while it
had a core to itself, less where the scheduler shared one with the benchmark).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

KIND = "1 thread of torch.mm (256x256 float32) in a loop"


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class Competitor:
    """One competitor process: ``start()``, ``stop() -> dict``; a context manager."""

    def __init__(self, ready_timeout_s: float = 120.0, settle_s: float = 0.0):
        self.ready_timeout_s = ready_timeout_s
        self.settle_s = settle_s
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.settled_s = 0.0

    def start(self) -> "Competitor":
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        root = str(Path(__file__).resolve().parents[2])  # fastmaml importable however the parent found it
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastmaml.bench.load"], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.t0 = time.perf_counter()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.ready_timeout_s)
        line = self.proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
        if line.strip() != b"ready":
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(f"the --load competitor did not start within {self.ready_timeout_s:g} s "
                               f"(exit code {code}, said {line[:200]!r})")
        self.settled_s = self._settle()
        return self

    def _settle(self) -> float:
        """Wait (at most ``settle_s``) until the 1-minute load average has risen by 0.5:
        about 42 s on an idle machine. A process that sizes its thread pool by the load
        at its start (``task_threads="auto"``: fastmaml.maml.tasks.usable_cores) then
        sees the competitor from the first measurement on."""
        t0 = time.perf_counter()
        try:
            base = os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
        while time.perf_counter() - t0 < self.settle_s and os.getloadavg()[0] < base + 0.5 and self.alive():
            time.sleep(1.0)
        return time.perf_counter() - t0

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> dict:
        """Stop the competitor (idempotent) and say what it did."""
        if self.proc is None:
            return {"on": False}
        proc, self.proc = self.proc, None
        wall = time.perf_counter() - self.t0
        cpu = _cpu_seconds(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc.stdout is not None:
            proc.stdout.close()
        return {"on": True, "kind": KIND, "pid": proc.pid, "wall_s": wall, "settled_s": self.settled_s,
                "cpu_s": cpu,
                "busy_fraction": None if cpu is None or wall <= 0 else cpu / wall}

    def __enter__(self) -> "Competitor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """The competitor's loop (run by :class:`Competitor` as ``python -m fastmaml.bench.load``)."""
    p = argparse.ArgumentParser(prog="python -m fastmaml.bench.load", description="a 1-thread busy loop")
    p.add_argument("--size", type=int, default=256, help="matrix size (default 256)")
    p.add_argument("--seconds", type=float, default=86400.0, help="stop after this long (default one day)")
    a = p.parse_args(argv)
    if a.size < 1 or not a.seconds > 0:
        p.error(f"--size must be >= 1 and --seconds > 0, got {a.size} and {a.seconds}")
    try:  # Linux: SIGTERM when the parent goes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = os.getppid()
    import torch

    torch.set_num_threads(1)
    x, y = torch.randn(a.size, a.size), torch.randn(a.size, a.size)
    out = torch.empty(a.size, a.size)
    deadline = time.monotonic() + a.seconds
    print("ready", flush=True)
    while os.getppid() == parent and time.monotonic() < deadline:
        t = time.monotonic()
        while time.monotonic() - t < 0.05:
            torch.mm(x, y, out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
