"""The MAML paper's experiment settings (Finn et al. 2017, §5 and the commands at the top
of cbfinn/maml ``main.py``), as named configurations of ``python -m fastmaml.train``.

=====================  ======  ====  ========  ===========  =========  ==========
config                 way/K   Q     meta-bat  inner steps  inner lr   iterations
=====================  ======  ====  ========  ===========  =========  ==========
sinusoid               K=10    10    25        1 (test 10)  0.01       70000
omniglot-5w1s/5w5s     5/1,5   K     32        1 (test 10)  0.4        60000
omniglot-20w1s/20w5s   20/1,5  K     16        5 (test 10)  0.1        60000
miniimagenet-5w1s      5/1     15    4         5 (test 10)  0.01       60000
miniimagenet-5w5s      5/5     15    2         5 (test 10)  0.01       60000
=====================  ======  ====  ========  ===========  =========  ==========

All use Adam with learning rate 1e-3 for the meta-update. ``--algo imaml`` adds the
proximal λ (``--lam``, default 2.0) and the CG steps per meta-gradient (``--cg-steps``,
default 5); ``--algo reptile`` uses the same inner steps and rate, and its meta-update applies
the outer optimizer to θ − mean_t φ_{t,K}. The query size follows the
MAML code (K per class for Omniglot, 15 for miniImageNet training); Omniglot's
characters are augmented by rotations of 90°·k as extra classes (in every split); Omniglot uses 64
filters and strided convolutions, miniImageNet 32 filters and max-pooling. Evaluation:
600 test episodes, 10 inner steps, accuracy ± 1.96·std/√600.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    name: str
    dataset: str  # 'sinusoid' | 'omniglot' | 'miniimagenet'
    n_way: int
    k_shot: int
    q_query: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    test_steps: int
    iterations: int
    meta_lr: float = 1e-3
    image_size: int = 0
    channels: int = 0
    filters: int = 64
    pool: str = "stride"
    rotations: int = 1
    val_every: int = 500
    val_episodes: int = 100
    test_episodes: int = 600
    first_order: bool = False
    algo: str = "maml"
    seed: int = 0
    lam: float = 2.0  # iMAML's proximal λ (--algo imaml)
    cg_steps: int = 5  # iMAML's CG iterations per meta-gradient (--algo imaml)
    outer_optimizer: str = "adam"  # the meta-update: "adam" | "sgd" (lr meta_lr)

    @property
    def classification(self) -> bool:
        return self.dataset != "sinusoid"

    def override(self, **changes: object) -> Config:
        """A copy with the given fields changed (None values are ignored)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _omniglot(n_way: int, k: int) -> Config:
    big = n_way == 20
    return Config(name=f"omniglot-{n_way}w{k}s", dataset="omniglot", n_way=n_way, k_shot=k, q_query=k,
                  meta_batch=16 if big else 32, inner_steps=5 if big else 1, inner_lr=0.1 if big else 0.4,
                  test_steps=10, iterations=60000, image_size=28, channels=1, filters=64, pool="stride",
                  rotations=4)


def _mini(k: int) -> Config:
    return Config(name=f"miniimagenet-5w{k}s", dataset="miniimagenet", n_way=5, k_shot=k, q_query=15,
                  meta_batch=4 if k == 1 else 2, inner_steps=5, inner_lr=0.01, test_steps=10, iterations=60000,
                  image_size=84, channels=3, filters=32, pool="max")


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config(name="sinusoid", dataset="sinusoid", n_way=1, k_shot=10, q_query=10, meta_batch=25, inner_steps=1,
           inner_lr=0.01, test_steps=10, iterations=70000, val_every=1000),
    _omniglot(5, 1), _omniglot(5, 5), _omniglot(20, 1), _omniglot(20, 5), _mini(1), _mini(5)]}


def get_config(name: str) -> Config:
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]
