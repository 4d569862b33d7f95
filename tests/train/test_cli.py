"""``python -m fastmaml.train`` end to end on synthetic data: files, resume, flags,
the paper's configurations, and 1 vs 2 processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmaml.train import CONFIGS, algos
from fastmaml.train.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--no-progress"]


def _read(out: Path) -> tuple[dict, dict]:
    log = json.loads((out / "log.json").read_text())
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    return log, ck


def test_omniglot_synthetic_end_to_end(tmp_path):
    out = tmp_path / "omni"
    main(["--config", "omniglot-5w1s", "--synthetic", "--iterations", "3", "--out", str(out), "--meta-batch", "4",
          "--val-every", "2", "--val-episodes", "4", "--test-episodes", "6", "--test-steps", "2", "--log-every", "1",
          *QUIET])
    log, ck = _read(out)
    assert [r["iteration"] for r in log["history"]["train"]] == [1, 2, 3]
    assert all(r["tasks_per_s"] > 0 and r["loss"] > 0 for r in log["history"]["train"])
    val = log["history"]["val"]
    assert [r["iteration"] for r in val] == [2, 3] and all(0 <= r["mean"] <= 1 and r["n"] == 4 for r in val)
    t = log["test"]
    assert t["metric"] == "accuracy" and t["n"] == 6 and t["steps"] == 2 and t["ci95"] >= 0
    assert ck["iteration"] == 3 and log["config"]["inner_lr"] == 0.4
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    common = ["--config", "sinusoid", "--val-episodes", "0", "--test-episodes", "0", "--log-every", "1", *QUIET]
    main([*common, "--iterations", "3", "--out", str(tmp_path / "a")])
    main([*common, "--iterations", "5", "--out", str(tmp_path / "a"), "--resume"])
    main([*common, "--iterations", "5", "--out", str(tmp_path / "b")])
    (la, ca), (lb, cb) = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert ca["iteration"] == 5 and [r["iteration"] for r in la["history"]["train"]] == [1, 2, 3, 4, 5]
    for k in cb["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert [r["loss"] for r in la["history"]["train"]] == [r["loss"] for r in lb["history"]["train"]]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main([*common, "--iterations", "2", "--out", str(tmp_path / "c"), "--resume"])
    with pytest.raises(ValueError, match="differs"):
        main([*common, "--iterations", "6", "--out", str(tmp_path / "a"), "--resume", "--inner-lr", "0.5"])


def test_flags_algo_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", "sinusoid", "--algo", "protomaml", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--algo must be one of" in err and "maml" in err and "fomaml" in err
    with pytest.raises(SystemExit):
        main(["--config", "omniglot-7w1s", "--out", str(tmp_path)])
    assert "config must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", "sinusoid", "--iterations", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="data-root"):
        main(["--config", "omniglot-5w1s", "--iterations", "1", "--out", str(tmp_path), *QUIET])
    with pytest.raises(ValueError, match="algo must be one of"):
        algos.build("protomaml", torch.nn.Linear(1, 1), CONFIGS["sinusoid"])
    fo = algos.build("maml", torch.nn.Linear(1, 1), CONFIGS["sinusoid"].override(first_order=True))
    assert fo.first_order and algos.build("fomaml", torch.nn.Linear(1, 1), CONFIGS["sinusoid"]).first_order
    log = main(["--config", "sinusoid", "--first-order", "--iterations", "1", "--out", str(tmp_path / "fo"),
                "--val-episodes", "0", "--test-episodes", "2", *QUIET])
    assert log["config"]["first_order"] is True and log["test"]["metric"] == "mse"


def test_paper_hyperparameters():
    c = CONFIGS
    assert set(c) == {"sinusoid", "omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                      "miniimagenet-5w1s", "miniimagenet-5w5s"}
    got = {n: (x.n_way, x.k_shot, x.meta_batch, x.inner_steps, x.inner_lr, x.test_steps, x.meta_lr, x.iterations)
           for n, x in c.items()}
    assert got == {
        "sinusoid": (1, 10, 25, 1, 0.01, 10, 1e-3, 70000),
        "omniglot-5w1s": (5, 1, 32, 1, 0.4, 10, 1e-3, 60000),
        "omniglot-5w5s": (5, 5, 32, 1, 0.4, 10, 1e-3, 60000),
        "omniglot-20w1s": (20, 1, 16, 5, 0.1, 10, 1e-3, 60000),
        "omniglot-20w5s": (20, 5, 16, 5, 0.1, 10, 1e-3, 60000),
        "miniimagenet-5w1s": (5, 1, 4, 5, 0.01, 10, 1e-3, 60000),
        "miniimagenet-5w5s": (5, 5, 2, 5, 0.01, 10, 1e-3, 60000),
    }
    assert c["miniimagenet-5w1s"].q_query == 15 and c["miniimagenet-5w1s"].filters == 32
    assert c["omniglot-5w1s"].rotations == 4 and c["omniglot-5w1s"].filters == 64


def test_torchrun_two_processes_match_one(tmp_path):
    """Same seeds, the global meta-batch of 5 split 3/2 over two gloo ranks: after two Adam
    steps θ equals the single-process run's (float64)."""
    common = ["--config", "sinusoid", "--iterations", "2", "--meta-batch", "5", "--dtype", "float64",
              "--val-episodes", "0", "--test-episodes", "0", "--device", "cpu", *QUIET]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    main([*common, "--out", str(tmp_path / "p1")])  # one process: this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastmaml.train", *common, "--out", str(tmp_path / "p2")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    (l1, c1), (l2, c2) = _read(tmp_path / "p1"), _read(tmp_path / "p2")
    assert l2["world_size"] == 2 and l1["world_size"] == 1
    for k in c1["model"]:
        torch.testing.assert_close(c2["model"][k], c1["model"][k], rtol=0, atol=1e-12)
    assert not torch.equal(c1["model"]["model.0.weight"], _initial_weight())  # it did train
    for a, b in zip(l1["history"]["train"], l2["history"]["train"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * max(1.0, abs(a["loss"]))


def _initial_weight() -> torch.Tensor:
    from fastmaml.train.loop import make_model

    torch.manual_seed(CONFIGS["sinusoid"].seed)
    return make_model(CONFIGS["sinusoid"]).to(torch.float64)[0].weight.detach()
