"""Meta-train MAML on the sinusoid regression of Finn et al. (2017), §5.1, with fastmaml.

Tasks: y = A·sin(x − φ), amplitude A ~ U[0.1, 5], phase φ ~ U[0, π], inputs x ~ U[−5, 5].
Model: MLP 1-40-40-1 with ReLU; K-shot support (10 during meta-training), MSE loss,
inner SGD lr 0.01, outer Adam lr 1e-3, meta-batch 25 tasks.

After meta-training, 600 fresh tasks are evaluated: the post-adaptation MSE on 100
query points, from 5-shot and 10-shot support sets, after 0, 1, 5 and 10 inner steps —
beside a baseline of the same network pretrained on all tasks jointly (ordinary
regression on samples from random tasks) and fine-tuned the same way. Prints the table
and saves a plot of one task's adapted curves.

    python docs/examples/sinusoid.py                     # the paper's 70,000 meta-iterations
    python docs/examples/sinusoid.py --iterations 2000   # a quick run
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import fastmaml


def sample_tasks(n_tasks: int, n_points: int, gen: torch.Generator, dtype=torch.float32):
    """Amplitudes, phases [n_tasks] and inputs/outputs [n_tasks, n_points, 1]."""
    amp = 0.1 + 4.9 * torch.rand(n_tasks, generator=gen)
    phase = math.pi * torch.rand(n_tasks, generator=gen)
    x = -5 + 10 * torch.rand(n_tasks, n_points, 1, generator=gen)
    y = amp[:, None, None] * torch.sin(x - phase[:, None, None])
    return amp, phase, x.to(dtype), y.to(dtype)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def evaluate(maml: fastmaml.MAML, gen: torch.Generator, n_tasks: int, shots: int,
             steps: list[int]) -> dict[int, tuple[float, float, int]]:
    """(mean query MSE, median, diverged tasks) over n_tasks fresh tasks after each number of inner steps."""
    amp, phase, xs, ys = sample_tasks(n_tasks, shots, gen)
    xq = torch.linspace(-5, 5, 100).reshape(1, 100, 1).expand(n_tasks, 100, 1).contiguous()
    yq = amp[:, None, None] * torch.sin(xq - phase[:, None, None])
    out = {}
    with torch.no_grad():
        pred0 = torch.func.vmap(maml.model)(xq)
    out[0] = _mean_mse(pred0, yq)
    for s in steps:
        fast = maml.adapt(xs, ys, steps=s)
        out[s] = _mean_mse(maml.predict(fast, xq), yq)
    return out


# A task's fine-tuning "diverged" when its query MSE is not finite or above this: every
# sinusoid here has amplitude <= 5, so even predicting 0 everywhere gives an MSE <= 12.5.
DIVERGED_MSE = 1e3


def _mean_mse(pred: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
    """Mean and median over tasks of the per-task MSE, over the tasks whose fine-tuning did
    not diverge, and how many diverged (SGD at a fixed lr can blow up on a few tasks' sharp
    losses, most often with 5 support points and many steps)."""
    per_task = ((pred - y) ** 2).mean(dim=(1, 2))
    ok = torch.isfinite(per_task) & (per_task <= DIVERGED_MSE)
    if not bool(ok.any()):
        return float("nan"), float("nan"), int((~ok).sum())
    kept = per_task[ok]
    return float(kept.mean()), float(kept.median()), int((~ok).sum())


def _cell(res: tuple[float, float, int]) -> str:
    mean, median, diverged = res
    return f"{mean:.4f} ({median:.4f})" + (f" {diverged} div." if diverged else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=70000, help="meta-iterations (paper: 70000)")
    ap.add_argument("--meta-batch", type=int, default=25)
    ap.add_argument("--shots", type=int, default=10, help="support points per task during meta-training")
    ap.add_argument("--inner-steps", type=int, default=1, help="inner steps during meta-training (paper: 1)")
    ap.add_argument("--inner-lr", type=float, default=0.01)
    ap.add_argument("--outer-lr", type=float, default=1e-3)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--eval-tasks", type=int, default=600)
    ap.add_argument("--plot", default="sinusoid.png", help="where to save the plot ('' = no plot)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    maml = fastmaml.MAML(make_model(), inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                         first_order=args.first_order, loss="mse")
    opt = torch.optim.Adam(maml.parameters(), lr=args.outer_lr)

    t0 = time.perf_counter()
    bar = tqdm(range(args.iterations), desc="meta-train", mininterval=1.0)
    for it in bar:
        _, _, x, y = sample_tasks(args.meta_batch, 2 * args.shots, gen)
        xs, ys, xq, yq = x[:, :args.shots], y[:, :args.shots], x[:, args.shots:], y[:, args.shots:]
        opt.zero_grad(set_to_none=True)
        loss = maml(xs.contiguous(), ys.contiguous(), xq.contiguous(), yq.contiguous())
        loss.backward()
        opt.step()
        if it % 100 == 0:
            bar.set_postfix(meta_loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    per_it = 1e3 * train_s / max(args.iterations, 1)

    # Baseline: the same network pretrained on all tasks jointly (plain regression).
    base = make_model()
    bopt = torch.optim.Adam(base.parameters(), lr=args.outer_lr)
    for _ in tqdm(range(args.iterations), desc="pretrain baseline", mininterval=1.0):
        _, _, x, y = sample_tasks(args.meta_batch, args.shots, gen)
        bopt.zero_grad(set_to_none=True)
        ((base(x) - y) ** 2).mean().backward()
        bopt.step()
    base_maml = fastmaml.MAML(base, inner_lr=args.inner_lr, inner_steps=1, loss="mse")

    steps = [1, 5, 10]
    rows = []
    for name, m in (("MAML", maml), ("pretrained", base_maml)):
        for shots in (5, 10):
            egen = torch.Generator().manual_seed(10_000 + shots)  # same tasks for both methods
            rows.append((name, shots, evaluate(m, egen, args.eval_tasks, shots, steps)))
    print(f"\nfastmaml path: {maml.path} ({maml.path_reason})")
    print(f"meta-training: {args.iterations} iterations in {train_s:.1f} s ({per_it:.2f} ms/iteration)")
    print(f"post-adaptation query MSE on {args.eval_tasks} fresh tasks (inner lr {args.inner_lr}):")
    print(f"{'method':<12}{'support':>8}" + "".join(f"{f'{s} steps':>26}" for s in [0] + steps))
    for name, shots, res in rows:
        print(f"{name:<12}{shots:>8}" + "".join(f"{_cell(res[s]):>26}" for s in [0] + steps))
    print(f"(mean (median) over tasks of the query MSE; 'div.': tasks whose fine-tuning diverged — MSE not finite "
          f"or > {DIVERGED_MSE:g} — left out of both)")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pgen = torch.Generator().manual_seed(12345)
        amp, phase, xs, ys = sample_tasks(1, 5, pgen)
        xg = torch.linspace(-5, 5, 200).reshape(1, 200, 1)
        yg = amp[0] * torch.sin(xg[0, :, 0] - phase[0])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(xg[0, :, 0], yg, "k-", lw=2, label="ground truth")
        ax.plot(xs[0, :, 0], ys[0, :, 0], "k^", ms=8, label="5-shot support")
        with torch.no_grad():
            ax.plot(xg[0, :, 0], maml.model(xg[0])[:, 0], ":", color="tab:green", label="MAML, pre-update")
        for s, style in ((1, "--"), (10, "-")):
            fast = maml.adapt(xs, ys, steps=s)
            ax.plot(xg[0, :, 0], maml.predict(fast, xg)[0, :, 0], style, color="tab:red", label=f"MAML, {s} step(s)")
        fast = base_maml.adapt(xs, ys, steps=10)
        ax.plot(xg[0, :, 0], base_maml.predict(fast, xg)[0, :, 0], "-", color="tab:blue", alpha=0.7,
                label="pretrained, 10 steps")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"sinusoid, {args.iterations} meta-iterations")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
