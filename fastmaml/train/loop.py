"""The meta-training loop behind ``python -m fastmaml.train``: data, model, algorithm,
the outer optimizer on its meta-gradient, periodic meta-validation on fixed episodes, checkpoints with
resume, the final meta-test, a JSON log and a PNG of the curves. The meta-step and the
outer optimizer depend on ``--algo`` / ``--outer-optimizer`` (:mod:`fastmaml.train.algos`).

Under ``torchrun --nproc-per-node P`` every rank builds the same model from the same
seed (then rank 0's θ is broadcast), draws its share of each meta-batch from the same
sampler seed (so P processes train on exactly the tasks one would), and the task-weighted
meta-gradients (and the meta-loss for the log) are summed by one all-reduce per step
(:func:`fastmaml.distributed.average_gradients`). Rank 0 writes the files.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from fastmaml import distributed as fd
from fastmaml.data import EpisodeSampler, SinusoidSampler, load_miniimagenet, load_omniglot
from fastmaml.train import algos, models
from fastmaml.train.configs import Config
from fastmaml.train.evaluate import evaluate

SYNTHETIC_CLASSES = {"omniglot": {"train": 1100, "val": 100, "test": 423},
                     "miniimagenet": {"train": 64, "val": 16, "test": 20}}
SYNTHETIC_PER_CLASS = 20
VAL_SEED, TEST_SEED = 1, 2


@dataclass
class Options:
    out: Path
    synthetic: bool = False
    data_root: Path | None = None
    omniglot_split: str = "maml"
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    save_every: int = 1000
    log_every: int = 10
    timeout_s: float = fd.DEFAULT_TIMEOUT_S


def _split_data(cfg: Config, opts: Options, split: str) -> torch.Tensor:
    """[n_classes, n_per_class, C, H, W] uint8 of one split: real or random."""
    if opts.synthetic:
        g = torch.Generator().manual_seed(cfg.seed + 1000 + ("train", "val", "test").index(split))
        n = SYNTHETIC_CLASSES[cfg.dataset][split]
        per = max(SYNTHETIC_PER_CLASS, cfg.k_shot + cfg.q_query)
        return torch.randint(0, 256, (n, per, cfg.channels, cfg.image_size, cfg.image_size), generator=g,
                             dtype=torch.uint8)
    if opts.data_root is None:
        raise ValueError(f"config {cfg.name!r} needs --data-root DIR (the {cfg.dataset} files) or --synthetic")
    if cfg.dataset == "omniglot":
        return load_omniglot(opts.data_root, split, scheme=opts.omniglot_split, image_size=cfg.image_size).data
    if cfg.dataset == "miniimagenet":
        return load_miniimagenet(opts.data_root, split, image_size=cfg.image_size).data
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def make_samplers(cfg: Config, opts: Options, rank: int, world: int) -> tuple[object, list, list]:
    """(train sampler, fixed validation episodes, fixed test episodes)."""
    dev, dt = torch.device(opts.device), getattr(torch, opts.dtype)
    eb = max(cfg.meta_batch, world)
    if not cfg.classification:
        def sin(seed: int, r: int = 0, w: int = 1) -> SinusoidSampler:
            return SinusoidSampler(cfg.k_shot, cfg.q_query, seed=seed, device=dev, dtype=dt, rank=r, world_size=w)
        return (sin(cfg.seed, rank, world),
                sin(0).fixed_episodes(cfg.val_episodes, eb, seed=VAL_SEED) if cfg.val_episodes else [],
                sin(0).fixed_episodes(cfg.test_episodes, eb, seed=TEST_SEED) if cfg.test_episodes else [])

    def images(split: str, r: int = 0, w: int = 1) -> EpisodeSampler:
        return EpisodeSampler(_split_data(cfg, opts, split).to(dev), cfg.n_way, cfg.k_shot, cfg.q_query,
                              seed=cfg.seed, rotations=cfg.rotations, rank=r, world_size=w, dtype=dt)
    val = images("val").fixed_episodes(cfg.val_episodes, eb, seed=VAL_SEED) if cfg.val_episodes else []
    test = images("test").fixed_episodes(cfg.test_episodes, eb, seed=TEST_SEED) if cfg.test_episodes else []
    return images("train", rank, world), val, test


def make_model(cfg: Config) -> nn.Module:
    if not cfg.classification:
        return models.sinusoid_mlp()
    return models.conv4(cfg.channels, cfg.n_way, cfg.image_size, filters=cfg.filters, pool=cfg.pool)


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def make_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The meta-update: Adam (the MAML paper's) or plain SGD, learning rate ``meta_lr``
    (SGD on Reptile's direction is plain Reptile with ε = meta_lr)."""
    if cfg.outer_optimizer == "adam":
        return torch.optim.Adam(module.parameters(), lr=cfg.meta_lr)
    if cfg.outer_optimizer == "sgd":
        return torch.optim.SGD(module.parameters(), lr=cfg.meta_lr)
    raise ValueError(f"outer_optimizer must be 'adam' or 'sgd', got {cfg.outer_optimizer!r}")


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: Config, module: nn.Module, opt: torch.optim.Optimizer, sampler: object,
                     device: str) -> tuple[int, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run without --resume first")
    ck = torch.load(path, map_location=device, weights_only=False)
    # fields newer than the checkpoint (lam, cg_steps, outer_optimizer) compare as their defaults
    defaults = {f.name: f.default for f in fields(Config) if f.default is not MISSING}
    old = {k: v for k, v in {**defaults, **ck["config"]}.items() if k != "iterations"}
    new = {k: v for k, v in asdict(cfg).items() if k != "iterations"}
    diff = {k: (old.get(k), new[k]) for k in new if old.get(k) != new[k]}
    if diff:
        raise ValueError(f"--resume: the checkpoint's configuration differs (checkpoint, now): {diff}")
    module.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sampler.generator.set_state(ck["sampler_rng"].to("cpu"))  # type: ignore[attr-defined]
    return int(ck["iteration"]), ck["history"]


def _plot(history: dict, cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    tr = history["train"]
    a.plot([r["iteration"] for r in tr], [r["loss"] for r in tr])
    a.set_xlabel("iteration")
    a.set_ylabel("meta-loss (train)")
    a.set_title(cfg.name)
    val = history["val"]
    if val:
        b.errorbar([r["iteration"] for r in val], [r["mean"] for r in val], yerr=[r["ci95"] for r in val],
                   marker="o", capsize=3)
    b.set_xlabel("iteration")
    b.set_ylabel(f"meta-val {val[0]['metric'] if val else 'metric'} (±95%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Config, opts: Options) -> dict:
    """Meta-train ``cfg`` with ``opts``; returns the log dict (also written to
    ``out/log.json`` by rank 0, with ``out/checkpoint.pt`` and ``out/curves.png``)."""
    rank, world = fd.init_from_env(timeout_s=opts.timeout_s, device=opts.device)
    if opts.device == "cuda" and world > 1:  # one GPU per rank (init_from_env set it from LOCAL_RANK)
        opts.device = f"cuda:{torch.cuda.current_device()}"
    if cfg.meta_batch < world:
        raise ValueError(f"meta_batch must be >= the number of processes {world}, got {cfg.meta_batch}")
    main = rank == 0
    out = Path(opts.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg).to(device=opts.device, dtype=getattr(torch, opts.dtype))
    module = algos.build(cfg.algo, model, cfg)
    fd.broadcast_parameters(module)
    opt = make_optimizer(module, cfg)
    sampler, val_eps, test_eps = make_samplers(cfg, opts, rank, world)
    ckpt = out / "checkpoint.pt"
    start, history = 0, {"train": [], "val": []}
    if opts.resume:
        start, history = _load_checkpoint(ckpt, cfg, module, opt, sampler, opts.device)
    steps_eval = algos.eval_steps(module, cfg.test_steps)
    log = {"config": asdict(cfg), "world_size": world, "machine": _machine(), "history": history}

    def save(it: int) -> None:
        if main:
            _atomic_save({"model": module.state_dict(), "optimizer": opt.state_dict(), "iteration": it,
                          "sampler_rng": sampler.generator.get_state(), "history": history,  # type: ignore[attr-defined]
                          "config": asdict(cfg)}, ckpt)
        fd.barrier()

    bar = None
    if main and opts.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.iterations, initial=start, desc=cfg.name, unit="it")
        except ImportError:
            bar = None
    window, w_loss, w_t0 = 0, 0.0, time.perf_counter()
    t_start, trained = time.perf_counter(), 0
    for it in range(start, cfg.iterations):
        xs, ys, xq, yq = sampler.sample(cfg.meta_batch)  # type: ignore[attr-defined]
        opt.zero_grad(set_to_none=True)
        loss = algos.meta_step(module, (xs, ys, xq, yq))
        loss_all = fd.average_gradients(module.parameters(), local_tasks=xs.shape[0], total_tasks=cfg.meta_batch,
                                        extra=loss.detach())
        opt.step()
        trained += 1
        window += 1
        w_loss += float(loss_all)  # type: ignore[arg-type]
        done = it + 1
        if window == opts.log_every or done == cfg.iterations:
            dt = time.perf_counter() - w_t0
            rate = window * cfg.meta_batch / dt
            history["train"].append({"iteration": done, "loss": w_loss / window, "tasks_per_s": rate})
            if bar is not None:
                bar.set_postfix(loss=f"{w_loss / window:.4f}", tasks_s=f"{rate:.1f}")
            window, w_loss, w_t0 = 0, 0.0, time.perf_counter()
        if bar is not None:
            bar.update(1)
        if val_eps and (done % cfg.val_every == 0 or done == cfg.iterations):
            res = evaluate(module, val_eps, steps_eval, cfg.classification)
            history["val"].append({"iteration": done, **res})
            if bar is not None:
                bar.write(f"[{cfg.name}] iteration {done}: meta-val {res['metric']} {res['mean']:.4f} "
                          f"± {res['ci95']:.4f} ({res['n']} episodes, {steps_eval} steps)")
            w_t0 = time.perf_counter()  # the rate excludes evaluation
        if done % opts.save_every == 0 or done == cfg.iterations:
            save(done)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    log["train_wall_s"] = wall
    log["tasks_per_s"] = trained * cfg.meta_batch / wall if trained else None
    if test_eps:
        log["test"] = evaluate(module, test_eps, steps_eval, cfg.classification)
        if main:
            t = log["test"]
            print(f"[{cfg.name}] meta-test {t['metric']}: {t['mean']:.4f} ± {t['ci95']:.4f} "
                  f"({t['n']} episodes, {t['steps']} inner steps)")
    if start >= cfg.iterations and not trained:
        save(start)
    if main:
        _write_json(log, out / "log.json")
        _plot(history, cfg, out / "curves.png")
    fd.barrier()
    return log
