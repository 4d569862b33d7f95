"""``python -m fastmaml.train``: meta-train one of the MAML paper's experiments.

    python -m fastmaml.train --config omniglot-5w1s --data-root ~/data/omniglot --out runs/omni
    python -m fastmaml.train --config omniglot-5w1s --synthetic --iterations 200 --out /tmp/omni
    python -m fastmaml.train --config sinusoid --iterations 2000 --resume --out runs/sine
    python -m fastmaml.train --config omniglot-5w1s --synthetic --algo imaml --lam 2 --cg-steps 5 --out /tmp/im
    python -m fastmaml.train --config sinusoid --algo reptile --outer-optimizer sgd --meta-lr 0.1 --out /tmp/rep
    torchrun --nproc-per-node 2 -m fastmaml.train --config sinusoid --out runs/sine2

Writes ``log.json`` (configuration, training curve with tasks/s, meta-validation
accuracy ± 95 %, final meta-test), ``checkpoint.pt`` and ``curves.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fastmaml.train import algos
from fastmaml.train.configs import CONFIGS, get_config
from fastmaml.train.loop import Options, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastmaml.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"experiment: {', '.join(sorted(CONFIGS))}")
    p.add_argument("--algo", default=None,
                   help=f"meta-learning algorithm: {', '.join(sorted(algos.ALGOS))} (default: the config's, maml)")
    p.add_argument("--first-order", action="store_true", default=None, help="first-order MAML (FOMAML)")
    p.add_argument("--lam", type=float, default=None, help="iMAML's proximal λ > 0 (--algo imaml; default 2.0)")
    p.add_argument("--cg-steps", type=int, default=None,
                   help="iMAML's CG iterations per meta-gradient (--algo imaml; default 5)")
    p.add_argument("--outer-optimizer", choices=("adam", "sgd"), default=None,
                   help="the meta-update at --meta-lr (default adam; sgd on Reptile is plain Reptile)")
    p.add_argument("--synthetic", action="store_true", help="random data of the right shapes, no dataset needed")
    p.add_argument("--data-root", type=Path, default=None, help="the dataset's folder (see fastmaml.data)")
    p.add_argument("--omniglot-split", choices=("maml", "vinyals"), default="maml")
    p.add_argument("--out", type=Path, default=Path("."), help="where log.json, checkpoint.pt, curves.png go")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--meta-batch", type=int, default=None)
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--inner-lr", type=float, default=None)
    p.add_argument("--test-steps", type=int, default=None)
    p.add_argument("--meta-lr", type=float, default=None)
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--val-episodes", type=int, default=None)
    p.add_argument("--test-episodes", type=int, default=None, help="final meta-test episodes (default 600; 0: none)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (distributed)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _positive_or_none(p: argparse.ArgumentParser, args: argparse.Namespace, names: list[str], minimum: int) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and v < minimum:
            p.error(f"--{n.replace('_', '-')} must be >= {minimum}, got {v}")


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = get_config(args.config)
    except ValueError as e:
        p.error(str(e))
    if args.algo is not None and args.algo not in algos.ALGOS:
        p.error(f"--algo must be one of {sorted(algos.ALGOS)}, got {args.algo!r}")
    _positive_or_none(p, args, ["iterations", "meta_batch", "inner_steps", "test_steps", "val_every", "cg_steps"], 1)
    if args.lam is not None and not (math.isfinite(args.lam) and args.lam > 0):
        p.error(f"--lam must be a finite float > 0, got {args.lam}")
    algo = args.algo or cfg.algo
    for flag, v, needs in (("--lam", args.lam, ("imaml",)), ("--cg-steps", args.cg_steps, ("imaml",)),
                           ("--first-order", args.first_order, ("maml", "fomaml"))):
        if v is not None and algo not in needs:
            p.error(f"{flag} applies to --algo {' or '.join(needs)} only, got --algo {algo}")
    _positive_or_none(p, args, ["val_episodes", "test_episodes"], 0)
    if args.save_every < 1 or args.log_every < 1:
        p.error("--save-every and --log-every must be >= 1")
    cfg = cfg.override(algo=args.algo, first_order=args.first_order, iterations=args.iterations,
                       meta_batch=args.meta_batch, inner_steps=args.inner_steps, inner_lr=args.inner_lr,
                       test_steps=args.test_steps, meta_lr=args.meta_lr, val_every=args.val_every,
                       val_episodes=args.val_episodes, test_episodes=args.test_episodes, seed=args.seed,
                       lam=args.lam, cg_steps=args.cg_steps, outer_optimizer=args.outer_optimizer)
    if cfg.dataset == "sinusoid" and args.data_root is not None:
        p.error("--data-root: the sinusoid config needs no dataset")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    opts = Options(out=args.out, synthetic=args.synthetic, data_root=args.data_root,
                   omniglot_split=args.omniglot_split, resume=args.resume, device=device, dtype=args.dtype,
                   progress=not args.no_progress, save_every=args.save_every, log_every=args.log_every,
                   timeout_s=args.timeout)
    try:
        return run(cfg, opts)
    finally:
        from fastmaml import distributed

        distributed.shutdown()


if __name__ == "__main__":
    main()
