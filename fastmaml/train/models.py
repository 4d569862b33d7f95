"""The networks of the MAML paper (Finn et al. 2017, §5 and its code): an MLP 1-40-40-1
for the sinusoid, and the 4-block convolutional net of Vinyals et al. for images.

Each conv block is conv 3x3 → BatchNorm → ReLU, followed for Omniglot by a stride-2
convolution (``pool="stride"``: 28→14→7→4→2, then the mean over the 2×2 positions) and
for miniImageNet by a 2×2 max-pool (``pool="max"``, 32 filters: 84→42→21→10→5, then the
flattened 800 features). BatchNorm uses the batch's statistics
(``track_running_stats=False``), as the MAML code does, so the model is a pure function
of its parameters and inputs.
"""

from __future__ import annotations

from torch import nn


def sinusoid_mlp(hidden: int = 40) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def conv4(in_channels: int, n_way: int, image_size: int, *, filters: int = 64, pool: str = "stride") -> nn.Sequential:
    """Conv-4 classifier for [B, in_channels, image_size, image_size] inputs."""
    if pool not in ("stride", "max"):
        raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
    layers: list[nn.Module] = []
    c, size = in_channels, image_size
    for _ in range(4):
        stride = 2 if pool == "stride" else 1
        layers += [nn.Conv2d(c, filters, 3, stride=stride, padding=1),
                   nn.BatchNorm2d(filters, track_running_stats=False), nn.ReLU()]
        if pool == "max":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            size = (size + 1) // 2
        c = filters
    if pool == "stride":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(filters, n_way)]
    else:
        layers += [nn.Flatten(), nn.Linear(filters * size * size, n_way)]
    return nn.Sequential(*layers)
