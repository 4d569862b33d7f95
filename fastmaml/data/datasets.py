"""The standard few-shot datasets read from their usual on-disk layouts, with their
standard class splits, decoded once into a cached tensor file (uint8) and loaded from
it afterwards. Nothing is downloaded: a missing file raises FileNotFoundError saying
where to put what.

* Omniglot (Lake et al. 2015): ``root/images_background/<alphabet>/<character>/*.png``
  and ``root/images_evaluation/...`` (the two zips of github.com/brendenlake/omniglot,
  unzipped), 1623 characters of 20 drawings, resized to 28×28 (Lanczos, as the MAML
  code's ``resize_images.py``). Splits: ``"maml"`` and ``"vinyals"`` (see
  :func:`omniglot_split`).
* miniImageNet (Vinyals et al. 2016, the split of Ravi & Larochelle 2017):
  ``root/{train,val,test}.csv`` (rows ``filename,label``) and ``root/images/<filename>``,
  resized to 84×84 (Lanczos, as the MAML code's ``proc_images.py``); 64/16/20 classes.
  The class lists come from the CSVs the user supplies; the loader checks their counts
  and that the splits are disjoint.
* CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's python pickles
  ``root/cifar-100-python/{train,test,meta}``; its 600 images per fine class (train and
  test files together), 32×32; the 64/16/20 class split shipped in ``splits/``.

Every loader returns a :class:`FewShotSplit`: ``data`` [n_classes, n_per_class, C, H, W]
uint8 and the class names; ``split.sampler(n_way, k_shot, q_query, ...)`` builds an
:class:`~fastmaml.data.EpisodeSampler` whose episodes come out as floats in [0, 1].
"""

from __future__ import annotations

import csv
import os
import pickle
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from fastmaml.data.sampler import EpisodeSampler

SPLITS = ("train", "val", "test")
OMNIGLOT_SCHEMES = ("maml", "vinyals")
MAML_OMNIGLOT_SEED = 1
MAML_OMNIGLOT_SIZES = (1100, 100)  # train, val; the rest (423 of 1623) is test
CACHE_VERSION = 1


@dataclass
class FewShotSplit:
    """One split of a dataset: ``data`` [n_classes, n_per_class, C, H, W] (uint8) and
    ``classes`` (names, in the order of ``data``'s first dim)."""

    data: torch.Tensor
    classes: list[str]
    name: str

    def sampler(self, n_way: int, k_shot: int, q_query: int, *, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32, **kwargs: object) -> EpisodeSampler:
        """An :class:`EpisodeSampler` over this split, its data moved to ``device``."""
        data = self.data if device is None else self.data.to(device)
        return EpisodeSampler(data, n_way, k_shot, q_query, dtype=dtype, **kwargs)  # type: ignore[arg-type]


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def read_split_file(name: str) -> list[str]:
    """The class list ``fastmaml/data/splits/<name>.txt`` (comment lines start with #)."""
    text = resources.files("fastmaml.data").joinpath("splits", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _progress(items: list, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional (the 'train' extra installs tqdm)
        return items
    return tqdm(items, desc=desc, unit="class")


def _cached(path: Path, decode: Callable[[], tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    """(data, names) from the cache file at ``path``, decoding and writing it first."""
    if path.is_file():
        blob = torch.load(path, weights_only=True)
        if isinstance(blob, dict) and blob.get("version") == CACHE_VERSION:
            return blob["data"], list(blob["classes"])
    data, names = decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save({"version": CACHE_VERSION, "data": data, "classes": names}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return data, names


def _image(path: Path, size: int, mode: str) -> torch.Tensor:
    from PIL import Image  # the 'train' extra (Pillow)

    with Image.open(path) as im:
        im = im.convert(mode)
        if im.size != (size, size):
            im = im.resize((size, size), resample=Image.LANCZOS)
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return t.view(size, size, len(mode)).permute(2, 0, 1).contiguous()


def _stack_equal(per_class: list[list[torch.Tensor]], names: list[str], what: str) -> torch.Tensor:
    counts = {len(v) for v in per_class}
    if len(counts) != 1:
        lo = min(range(len(names)), key=lambda i: len(per_class[i]))
        raise ValueError(f"{what}: every class must have the same number of images, got {sorted(counts)} "
                         f"(e.g. {names[lo]!r} has {len(per_class[lo])})")
    return torch.stack([torch.stack(v) for v in per_class])


# --- Omniglot ---------------------------------------------------------------------------
def _omniglot_characters(root: Path) -> list[str]:
    missing = [d for d in ("images_background", "images_evaluation") if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"Omniglot: {', '.join(str(root / d) for d in missing)} not found. Download images_background.zip and "
            f"images_evaluation.zip from https://github.com/brendenlake/omniglot (python/) and unzip both into "
            f"{root}, so that {root}/images_background/<alphabet>/<character>/*.png exist.")
    return sorted(f"{top}/{a.name}/{c.name}" for top in ("images_background", "images_evaluation")
                  for a in (root / top).iterdir() if a.is_dir() for c in a.iterdir() if c.is_dir())


def omniglot_split(characters: list[str], scheme: str, split: str) -> list[str]:
    """The characters (``"images_background/<alphabet>/<character>"``) of a split.

    ``"vinyals"``: the lists of Vinyals et al. (2016) in ``splits/`` (1028/172/423
    characters; train and val from images_background and 236 of images_evaluation).
    ``"maml"``: the procedure of the MAML code (cbfinn/maml ``data_generator.py``): the
    list of all 1623 ``<alphabet>/<character>`` folders, ``random.seed(1)``,
    ``random.shuffle``, then the first 1100 train, the next 100 val, the rest (423)
    test. The original listed the folders in ``os.listdir`` order, which depends on the
    file system, and ran Python 2's shuffle; here the list is sorted by (alphabet,
    character) and shuffled by Python 3's ``random.Random(1)``, so the classes may
    differ from the original machine's (the sizes and the procedure are the same).
    The original's ``--test_set`` flag evaluated on the 100 and validated on the 423;
    here val is the 100 and test the 423, the sizes the paper reports.
    """
    _check_split(split)
    if scheme == "vinyals":
        wanted = read_split_file(f"omniglot_vinyals_{split}")
        have = set(characters)
        missing = [c for c in wanted if c not in have]
        if missing:
            raise FileNotFoundError(f"Omniglot (vinyals split): {len(missing)} character folders are missing, "
                                    f"e.g. {missing[0]!r}; is the dataset complete?")
        return wanted
    if scheme != "maml":
        raise ValueError(f"scheme must be one of {OMNIGLOT_SCHEMES}, got {scheme!r}")
    order = sorted(characters, key=lambda c: tuple(c.split("/")[1:]))
    random.Random(MAML_OMNIGLOT_SEED).shuffle(order)
    n_train, n_val = MAML_OMNIGLOT_SIZES
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}[split]


def load_omniglot(root: str | os.PathLike, split: str = "train", *, scheme: str = "maml", image_size: int = 28,
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> FewShotSplit:
    """Omniglot's ``split`` under ``scheme`` ('maml' | 'vinyals'): data
    [n_characters, 20, 1, image_size, image_size] uint8 (white 255 background, dark
    strokes, as the PNGs). All characters are decoded once into
    ``cache_dir/omniglot_<image_size>.pt`` (default cache_dir: root)."""
    root, split = Path(root), _check_split(split)
    if scheme not in OMNIGLOT_SCHEMES:
        raise ValueError(f"scheme must be one of {OMNIGLOT_SCHEMES}, got {scheme!r}")
    cache = Path(cache_dir if cache_dir is not None else root) / f"omniglot_{image_size}.pt"

    def decode() -> tuple[torch.Tensor, list[str]]:
        chars = _omniglot_characters(root)
        imgs = [[_image(p, image_size, "L") for p in sorted((root / c).glob("*.png"))]
                for c in _progress(chars, "Omniglot (first run: decoding once)", progress)]
        return _stack_equal(imgs, chars, "Omniglot"), chars

    data, chars = _cached(cache, decode)
    names = omniglot_split(chars, scheme, split)
    index = {c: i for i, c in enumerate(chars)}
    return FewShotSplit(data[torch.tensor([index[c] for c in names])], names, f"omniglot-{scheme}-{split}")


# --- miniImageNet ------------------------------------------------------------------------
MINIIMAGENET_CLASSES = {"train": 64, "val": 16, "test": 20}


def _read_csv(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"miniImageNet: {path} not found. Put the split files train.csv, val.csv and test.csv of Ravi & "
            f"Larochelle (https://github.com/twitter/meta-learning-lstm, data/miniImagenet/) in {path.parent} and "
            f"the images they name in {path.parent / 'images'}.")
    classes: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise ValueError(f"miniImageNet: {path} must start with the header 'filename,label', got {header!r}")
        for row in rows:
            if row:
                classes.setdefault(row[1].strip(), []).append(row[0].strip())
    return classes


def load_miniimagenet(root: str | os.PathLike, split: str = "train", *, image_size: int = 84,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True) -> FewShotSplit:
    """miniImageNet's ``split``: data [n_classes, 600, 3, image_size, image_size] uint8,
    classes in the CSV's order. Each split is decoded once into
    ``cache_dir/miniimagenet_<split>_<image_size>.pt`` (default cache_dir: root)."""
    root, split = Path(root), _check_split(split)
    tables = {s: _read_csv(root / f"{s}.csv") for s in SPLITS}
    for s, want in MINIIMAGENET_CLASSES.items():
        if len(tables[s]) != want:
            raise ValueError(f"miniImageNet: {root / (s + '.csv')} must list {want} classes (the Ravi & Larochelle "
                             f"split), got {len(tables[s])}")
    seen: dict[str, str] = {}
    for s in SPLITS:
        for c in tables[s]:
            if c in seen:
                raise ValueError(f"miniImageNet: class {c!r} is in both {seen[c]}.csv and {s}.csv")
            seen[c] = s
    cache = Path(cache_dir if cache_dir is not None else root) / f"miniimagenet_{split}_{image_size}.pt"
    table = tables[split]

    def decode() -> tuple[torch.Tensor, list[str]]:
        names = list(table)
        missing = [f for c in names for f in table[c] if not (root / "images" / f).is_file()]
        if missing:
            raise FileNotFoundError(f"miniImageNet: {len(missing)} images of {split}.csv are missing from "
                                    f"{root / 'images'}, e.g. {missing[0]!r}. Unpack the images there.")
        imgs = [[_image(root / "images" / f, image_size, "RGB") for f in table[c]]
                for c in _progress(names, f"miniImageNet {split} (first run: decoding once)", progress)]
        return _stack_equal(imgs, names, "miniImageNet"), names

    data, names = _cached(cache, decode)
    return FewShotSplit(data, names, f"miniimagenet-{split}")


# --- CIFAR-FS ----------------------------------------------------------------------------
def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-FS: {path} not found. Download CIFAR-100's python version (cifar-100-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html) and unpack it in {path.parent.parent}, so that "
            f"{path.parent}/train, test and meta exist.")
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar_fs(root: str | os.PathLike, split: str = "train", *, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> FewShotSplit:
    """CIFAR-FS's ``split`` (64/16/20 classes): data [n_classes, 600, 3, 32, 32] uint8.
    All 100 classes are decoded once into ``cache_dir/cifar100_fs.pt``."""
    root, split = Path(root), _check_split(split)
    base = root / "cifar-100-python"
    cache = Path(cache_dir if cache_dir is not None else root) / "cifar100_fs.pt"

    def decode() -> tuple[torch.Tensor, list[str]]:
        meta = _unpickle(base / "meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"fine_label_names"]]
        xs, ys = [], []
        for part in _progress(["train", "test"], "CIFAR-100 (first run: decoding once)", progress):
            d = _unpickle(base / part)
            xs.append(torch.as_tensor(d[b"data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            ys.append(torch.as_tensor(d[b"fine_labels"], dtype=torch.int64))
        x, y = torch.cat(xs), torch.cat(ys)
        order = torch.sort(y, stable=True).indices
        counts = torch.bincount(y, minlength=len(names))
        if int(counts.min()) != int(counts.max()):
            raise ValueError(f"CIFAR-FS: every CIFAR-100 class must have the same number of images, got "
                             f"{int(counts.min())} to {int(counts.max())}")
        return x[order].view(len(names), int(counts[0]), 3, 32, 32), names

    data, names = _cached(cache, decode)
    wanted = read_split_file(f"cifar_fs_{split}")
    index = {c: i for i, c in enumerate(names)}
    unknown = [c for c in wanted if c not in index]
    if unknown:
        raise ValueError(f"CIFAR-FS: classes {unknown[:3]} of the split are not CIFAR-100 fine labels of "
                         f"{base / 'meta'}")
    return FewShotSplit(data[torch.tensor([index[c] for c in wanted])], wanted, f"cifar-fs-{split}")
