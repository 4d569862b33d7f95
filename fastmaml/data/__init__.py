"""Few-shot data: vectorised episode samplers, the standard datasets and splits, and
adapters from learn2learn/torchmeta batches (see the README's "Train" section)."""

from fastmaml.data.adapters import from_learn2learn, from_torchmeta
from fastmaml.data.datasets import (FewShotSplit, load_cifar_fs, load_miniimagenet, load_omniglot, omniglot_split,
                                    read_split_file)
from fastmaml.data.sampler import EpisodeSampler, SinusoidSampler, group_by_class

__all__ = ["EpisodeSampler", "SinusoidSampler", "group_by_class", "FewShotSplit", "load_omniglot",
           "load_miniimagenet", "load_cifar_fs", "omniglot_split", "read_split_file", "from_learn2learn",
           "from_torchmeta"]
