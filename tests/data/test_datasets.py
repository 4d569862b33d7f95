"""The dataset loaders on small generated fixtures in exactly the real on-disk layouts:
Omniglot PNG folders, miniImageNet CSVs + images, CIFAR-100's python pickles."""

from __future__ import annotations

import csv
import pickle
import random
import shutil

import pytest
import torch

from fastmaml.data import load_cifar_fs, load_miniimagenet, load_omniglot, omniglot_split, read_split_file

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _value(i: int, j: int) -> int:
    return (7 * i + 100 * j) % 251


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory):
    """All 1623 character folders (named as in the Vinyals lists), 2 constant 6x6 PNGs each."""
    root = tmp_path_factory.mktemp("omniglot")
    chars = sorted(sum((read_split_file(f"omniglot_vinyals_{s}") for s in ("train", "val", "test")), []))
    for i, c in enumerate(chars):
        d = root / c
        d.mkdir(parents=True)
        for j in range(2):
            Image.new("L", (6, 6), _value(i, j)).save(d / f"{i:04d}_{j + 1:02d}.png")
    return root, chars


def test_omniglot_vinyals_split_and_contents(omniglot_root, tmp_path):
    root, chars = omniglot_root
    sizes = {}
    for split in ("train", "val", "test"):
        s = load_omniglot(root, split, scheme="vinyals", cache_dir=tmp_path, progress=(split == "train"))
        assert s.classes == read_split_file(f"omniglot_vinyals_{split}")
        assert s.data.shape == (len(s.classes), 2, 1, 28, 28) and s.data.dtype == torch.uint8
        for k in (0, len(s.classes) // 2, len(s.classes) - 1):
            i = chars.index(s.classes[k])
            for j in range(2):
                assert bool((s.data[k, j] == _value(i, j)).all()), (s.classes[k], j)
        sizes[split] = len(s.classes)
    assert sizes == {"train": 1028, "val": 172, "test": 423}
    assert (tmp_path / "omniglot_28.pt").is_file()


def test_omniglot_maml_split_procedure(omniglot_root, tmp_path):
    root, chars = omniglot_root
    got = {s: load_omniglot(root, s, scheme="maml", cache_dir=tmp_path, progress=False).classes
           for s in ("train", "val", "test")}
    assert [len(got[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert set(got["train"]) | set(got["val"]) | set(got["test"]) == set(chars)
    order = sorted(chars, key=lambda c: tuple(c.split("/")[1:]))
    random.Random(1).shuffle(order)
    assert got["train"] == order[:1100] and got["val"] == order[1100:1200] and got["test"] == order[1200:]
    # pinned: the split must not change silently between versions
    assert got["train"][:2] == ["images_evaluation/Gurmukhi/character23", "images_evaluation/Malayalam/character36"]
    assert got["val"][0] == "images_background/Tifinagh/character11"
    assert got["test"][0] == "images_evaluation/Keble/character04"
    assert omniglot_split(list(reversed(chars)), "maml", "val") == got["val"]  # listing order does not matter


def test_omniglot_cache_is_used_and_errors(omniglot_root, tmp_path):
    root, _ = omniglot_root
    cache = tmp_path / "cache"
    first = load_omniglot(root, "val", scheme="vinyals", cache_dir=cache, progress=False)
    empty = tmp_path / "no_images"
    empty.mkdir()
    again = load_omniglot(empty, "val", scheme="vinyals", cache_dir=cache, progress=False)  # from the cache only
    assert torch.equal(first.data, again.data) and first.classes == again.classes
    with pytest.raises(FileNotFoundError, match="images_background"):
        load_omniglot(empty, "train", cache_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="scheme"):
        load_omniglot(root, "train", scheme="lake", cache_dir=cache)
    with pytest.raises(ValueError, match="split"):
        load_omniglot(root, "trainval", cache_dir=cache)


def _mini_fixture(root, n_img=3):
    (root / "images").mkdir(parents=True)
    classes = [f"n{i:08d}" for i in range(100)]
    splits = {"train": classes[:64], "val": classes[64:80], "test": classes[80:]}
    for split, names in splits.items():
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for c in names:
                for j in range(n_img):
                    fname = f"{c}{j + 1:08d}.jpg"
                    color = (int(c[1:]) * 2, 50 * j, 200)
                    Image.new("RGB", (12, 10), color).save(root / "images" / fname, quality=100)
                    w.writerow([fname, c])
    return splits


def test_miniimagenet_csv_layout(tmp_path):
    root = tmp_path / "mini"
    splits = _mini_fixture(root)
    for split, want in splits.items():
        s = load_miniimagenet(root, split, progress=False)
        assert s.classes == want
        assert s.data.shape == (len(want), 3, 3, 84, 84) and s.data.dtype == torch.uint8
        k = len(want) - 1
        px = s.data[k, 2, :, 40, 40].tolist()  # JPEG: colors within a few levels
        assert all(abs(a - b) <= 3 for a, b in zip(px, (int(want[k][1:]) * 2, 100, 200))), px
        assert (root / f"miniimagenet_{split}_84.pt").is_file()
    shutil.rmtree(root / "images")  # the cache serves from now on
    assert load_miniimagenet(root, "val", progress=False).classes == splits["val"]
    assert load_miniimagenet(root, "val", progress=False).sampler(5, 1, 2).sample(2)[0].shape == (2, 5, 3, 84, 84)


def test_miniimagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        load_miniimagenet(tmp_path, "train")
    root = tmp_path / "mini"
    _mini_fixture(root, n_img=1)
    rows = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(rows[:-1]) + "\n")  # drop a class: 15 instead of 16
    with pytest.raises(ValueError, match="16 classes"):
        load_miniimagenet(root, "train", progress=False)
    (root / "val.csv").write_text("\n".join(rows[:-1] + ["n00000000000001.jpg,n00000000"]) + "\n")
    with pytest.raises(ValueError, match="both"):
        load_miniimagenet(root, "train", progress=False)
    (root / "val.csv").write_text("\n".join(rows) + "\n")
    (root / "images" / "n0000000100000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_miniimagenet(root, "train", progress=False)


def _cifar_fixture(root):
    names = sorted(sum((read_split_file(f"cifar_fs_{s}") for s in ("train", "val", "test")), []))
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": []}, f)
    for part, per in (("train", 5), ("test", 1)):
        labels = [i for _ in range(per) for i in range(100)]
        random.Random(part).shuffle(labels)
        data = torch.tensor([[lab] * 3072 for lab in labels], dtype=torch.uint8).numpy()
        with open(base / part, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, f)
    return names


def test_cifar_fs_pickles_and_split(tmp_path):
    names = _cifar_fixture(tmp_path)
    sizes = {}
    for split in ("train", "val", "test"):
        s = load_cifar_fs(tmp_path, split, progress=False)
        assert s.classes == read_split_file(f"cifar_fs_{split}")
        assert s.data.shape == (len(s.classes), 6, 3, 32, 32)
        for k, c in enumerate(s.classes):
            assert bool((s.data[k] == names.index(c)).all())
        sizes[split] = len(s.classes)
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert (tmp_path / "cifar100_fs.pt").is_file()
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar_fs(tmp_path / "none", "train")
