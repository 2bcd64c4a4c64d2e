"""Tests for harness/data.py: MNIST and CIFAR-10 from a caller-given data root.

Tiny fake data sets are written to ``tmp_path``: MNIST as idx files in
torchvision's raw layout, plain and gzip-compressed; CIFAR-10 as
torchvision's pickles and as ``.npz`` archives with shuffled rows. The
``test_real_*`` tests read the real MNIST and CIFAR-10 test sets when the
``DATA_ROOT`` environment variable points at a data root holding them.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import (
    CIFAR10_SPLIT_SIZES,
    DATASET_CLASSES,
    DATASET_NAMES,
    DATASET_SHAPES,
    cifar10_files,
    load_cifar10,
    load_dataset,
    load_mnist,
    mnist_files,
    mnist_test_subset,
    read_idx,
    test_subset,
)

# Test-set label counts of MNIST (LeCun et al.), digits 0..9.
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An unsigned-byte idx file: magic (0x08 type, ndim), big-endian dims, data."""
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    labels = (np.arange(n) * 3 + seed) % 10
    return images, labels.astype(np.uint8)


def write_split(root: Path, train: bool, images, labels, compress: bool, image_magic=None, label_magic=None):
    image_path, label_path = mnist_files(root, train)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    for path, array, magic in ((image_path, images, image_magic), (label_path, labels, label_magic)):
        data = idx_bytes(array, magic)
        if compress:
            with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
                handle.write(data)
        else:
            path.write_bytes(data)


@pytest.fixture(params=["gz", "plain"])
def fake_root(request, tmp_path):
    """A data root with a 7-image test split and a 5-image training split."""
    compress = request.param == "gz"
    test = fake_split(7, seed=1)
    train = fake_split(5, seed=2)
    write_split(tmp_path, False, *test, compress=compress)
    write_split(tmp_path, True, *train, compress=compress)
    return tmp_path, test, train


def test_load_fake_split_shapes_values_labels(fake_root):
    root, (test_images, test_labels), (train_images, train_labels) = fake_root
    for train, images, labels in ((False, test_images, test_labels), (True, train_images, train_labels)):
        x, y = load_mnist(root, train=train)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(images), 1, 28, 28) and y.shape == (len(images),)
        np.testing.assert_array_equal((x[:, 0] * 255).round().to(torch.uint8).numpy(), images)
        np.testing.assert_allclose(x[:, 0].numpy(), images.astype(np.float32) / 255, rtol=0, atol=0)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        np.testing.assert_array_equal(y.numpy(), labels)


def test_path_like_and_string_roots_agree(fake_root):
    root = fake_root[0]
    x1, y1 = load_mnist(root)
    x2, y2 = load_mnist(str(root))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_extracted_file_preferred_and_gz_equivalent(tmp_path):
    images, labels = fake_split(4, seed=3)
    write_split(tmp_path, False, images, labels, compress=True)
    from_gz = load_mnist(tmp_path)
    write_split(tmp_path, False, images, labels, compress=False)
    both = load_mnist(tmp_path)
    assert torch.equal(from_gz[0], both[0]) and torch.equal(from_gz[1], both[1])
    # The extracted file wins when both exist: corrupt the archive, still loads.
    image_path, _ = mnist_files(tmp_path, False)
    image_path.with_name(image_path.name + ".gz").write_bytes(b"not gzip")
    assert torch.equal(load_mnist(tmp_path)[0], from_gz[0])


def test_matches_torchvision_reader(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    test = fake_split(6, seed=4)
    write_split(tmp_path, False, *test, compress=False)
    write_split(tmp_path, True, *fake_split(3, seed=5), compress=False)
    reference = torchvision.datasets.MNIST(str(tmp_path), train=False, download=False)
    x, y = load_mnist(tmp_path)
    assert torch.equal(x[:, 0], reference.data.float() / 255)
    assert torch.equal(y, reference.targets)


def test_read_only_gz_folder(tmp_path):
    write_split(tmp_path, False, *fake_split(3, seed=6), compress=True)
    raw = mnist_files(tmp_path, False)[0].parent
    for path in raw.iterdir():
        path.chmod(0o444)
    raw.chmod(0o555)
    try:
        x, _ = load_mnist(tmp_path)
        assert x.shape == (3, 1, 28, 28)
        assert sorted(p.name for p in raw.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    finally:
        raw.chmod(0o755)


@pytest.mark.parametrize("compress", [True, False])
def test_wrong_magic_numbers(tmp_path, compress):
    images, labels = fake_split(3, seed=7)
    # Images and labels swapped in kind: label magic on the image file.
    write_split(tmp_path, False, images, labels, compress=compress, image_magic=0x00000801)
    with pytest.raises(ValueError, match=r"magic number is 0x00000801, expected 0x00000803"):
        load_mnist(tmp_path)
    # Non-byte element type (0x0D = float32) on the label file.
    write_split(tmp_path, False, images, labels, compress=compress, label_magic=0x00000D01)
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.*magic number is 0x00000d01, expected 0x00000801"):
        load_mnist(tmp_path)


def test_truncated_and_mismatched_files(tmp_path):
    images, labels = fake_split(3, seed=8)
    write_split(tmp_path, False, images, labels, compress=False)
    image_path, label_path = mnist_files(tmp_path, False)
    image_path.write_bytes(image_path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_mnist(tmp_path)
    write_split(tmp_path, False, images, labels[:2], compress=False)
    with pytest.raises(ValueError, match="3 images but labels of shape"):
        load_mnist(tmp_path)
    write_split(tmp_path, False, images[:, :27], labels, compress=False)
    with pytest.raises(ValueError, match=r"expected \(N, 28, 28\)"):
        load_mnist(tmp_path)
    write_split(tmp_path, False, images, labels, compress=False)
    label_path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        load_mnist(tmp_path)


def test_corrupt_gzip(tmp_path):
    images, labels = fake_split(3, seed=9)
    write_split(tmp_path, False, images, labels, compress=True)
    image_path, _ = mnist_files(tmp_path, False)
    gz = image_path.with_name(image_path.name + ".gz")
    gz.write_bytes(gz.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read the idx file"):
        load_mnist(tmp_path)


def test_read_idx_direct(tmp_path):
    path = tmp_path / "labels.idx"
    path.write_bytes(idx_bytes(np.array([1, 2, 3])))
    np.testing.assert_array_equal(read_idx(path, 0x801), [1, 2, 3])


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        load_mnist(tmp_path / "nowhere")
    message = str(caught.value)
    assert "t10k-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "nowhere") in message
    assert "download=True" in message and "DATA_ROOT" in message and "--data-root" in message
    assert "test" in message


def test_missing_labels_only(tmp_path):
    images, labels = fake_split(2, seed=10)
    write_split(tmp_path, True, images, labels, compress=True)
    _, label_path = mnist_files(tmp_path, True)
    label_path.with_name(label_path.name + ".gz").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte") as caught:
        load_mnist(tmp_path, train=True)
    assert "train-images" not in str(caught.value)  # only the missing file is named
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_mnist(tmp_path, train=False)


def test_no_data_root():
    with pytest.raises(ValueError, match="data_root must be given"):
        load_mnist(None)


def test_download_delegates_to_torchvision(tmp_path, monkeypatch):
    """download=True hands the data root to torchvision's MNIST (no network here)."""
    torchvision = pytest.importorskip("torchvision")
    images, labels = fake_split(4, seed=11)
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_split(Path(root), train, images, labels, compress=False)  # where torchvision puts them
            self.data = torch.from_numpy(images.copy())
            self.targets = torch.from_numpy(labels.astype(np.int64))

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    x, y = load_mnist(tmp_path, train=False, download=True)
    assert calls == [(str(tmp_path), False, True)]
    assert x.shape == (4, 1, 28, 28) and y.tolist() == labels.tolist()
    # Once the files exist, torchvision is not called again.
    x2, _ = load_mnist(tmp_path, train=False, download=True)
    assert len(calls) == 1 and torch.equal(x, x2)


def test_test_subset_is_deterministic_slice(fake_root):
    root = fake_root[0]
    all_x, all_y = load_mnist(root)
    x, y = mnist_test_subset(root, 3)
    assert torch.equal(x, all_x[:3]) and torch.equal(y, all_y[:3])
    x, y = mnist_test_subset(root, 4, start=3)
    assert torch.equal(x, all_x[3:7]) and torch.equal(y, all_y[3:7])
    again = mnist_test_subset(root, 4, start=3)
    assert torch.equal(x, again[0])
    x[0] += 1  # a copy: mutating it leaves later loads alone
    assert torch.equal(mnist_test_subset(root, 4, start=3)[0], again[0])


@pytest.mark.parametrize("n, start", [(0, 0), (-1, 0), (3, -1), (8, 0), (2, 6), (1.5, 0), (True, 0)])
def test_test_subset_range_errors(fake_root, n, start):
    with pytest.raises(ValueError):
        mnist_test_subset(fake_root[0], n, start=start)


# CIFAR-10 ---------------------------------------------------------------------


def fake_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random RGB images (N, 32, 32, 3) and labels, in "torchvision's order"."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    images[0, 0, 0, 0], images[0, 0, 0, 1] = 0, 255  # both ends of the range
    labels = (np.arange(n) * 7 + seed) % 10
    return images, labels


def as_loaded(images: np.ndarray) -> torch.Tensor:
    """What the loader should return for uint8 HWC ``images``."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255)


def write_cifar_pickles(root: Path, train: bool, images, labels, protocol: int = 4, key=bytes.decode):
    """torchvision's layout: the split's rows divided over its batch files in order.

    ``key`` turns a key name into the key written: bytes as in the original
    (Python 2) files, or ``str`` as in a copy pickled again by Python 3.
    """
    files, _ = cifar10_files(root, train)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for path, rows in zip(files, np.array_split(np.arange(len(labels)), len(files))):
        batch = {
            "batch_label": b"fake batch",
            "labels": [int(label) for label in labels[rows]],
            "data": images[rows].transpose(0, 3, 1, 2).reshape(len(rows), 3072),  # RGB planes, as in the originals
            "filenames": [b"fake_%d.png" % row for row in rows],
        }
        path.write_bytes(pickle.dumps({key(name): value for name, value in batch.items()}, protocol=protocol))


def bytes_key(name: str) -> bytes:
    return name.encode()


def write_cifar_npz(root: Path, train: bool, images, labels, seed: int) -> np.ndarray:
    """The ``.npz`` layout with the rows shuffled; returns the row order (``orig_index`` of each row)."""
    _, files = cifar10_files(root, train)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    shuffled = np.random.default_rng(seed).permutation(len(labels))
    for path, rows in zip(files, np.array_split(shuffled, len(files))):
        np.savez(path, data=images[rows], labels=labels[rows], orig_index=rows)
    return shuffled


@pytest.fixture
def small_cifar(monkeypatch):
    """Make 6 test and 10 training images a complete CIFAR-10, so that tiny fakes pass the count check."""
    monkeypatch.setitem(CIFAR10_SPLIT_SIZES, "test", 6)
    monkeypatch.setitem(CIFAR10_SPLIT_SIZES, "train", 10)
    return {False: 6, True: 10}


@pytest.mark.parametrize("train", [False, True])
def test_cifar10_npz_restores_torchvision_order(tmp_path, small_cifar, train):
    images, labels = fake_cifar(small_cifar[train], seed=1)
    shuffled = write_cifar_npz(tmp_path, train, images, labels, seed=2)
    assert not np.array_equal(shuffled, np.arange(len(labels)))  # the files are not already in order
    x, y = load_cifar10(tmp_path, train=train)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(labels), *DATASET_SHAPES["cifar10"]) and y.shape == (len(labels),)
    assert torch.equal(x, as_loaded(images)) and y.tolist() == labels.tolist()
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Another shuffle of the same images, another root: the same result.
    write_cifar_npz(tmp_path / "other", train, images, labels, seed=3)
    x2, y2 = load_cifar10(tmp_path / "other", train=train)
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("train", [False, True])
def test_cifar10_pickles_agree_with_npz(tmp_path, small_cifar, train, protocol):
    images, labels = fake_cifar(small_cifar[train], seed=4)
    write_cifar_pickles(tmp_path / "pickles", train, images, labels, protocol=protocol, key=bytes_key)
    write_cifar_npz(tmp_path / "npz", train, images, labels, seed=5)
    x, y = load_cifar10(tmp_path / "pickles", train=train)
    assert x.shape == (len(labels), 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, as_loaded(images)) and y.tolist() == labels.tolist()
    x2, y2 = load_cifar10(tmp_path / "npz", train=train)
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("train", [False, True])
def test_cifar10_pickles_win_over_npz(tmp_path, small_cifar, train):
    images, labels = fake_cifar(small_cifar[train], seed=6)
    write_cifar_pickles(tmp_path, train, images, labels, key=bytes_key)
    write_cifar_npz(tmp_path, train, 255 - images, (labels + 1) % 10, seed=7)
    x, y = load_cifar10(tmp_path, train=train)
    assert torch.equal(x, as_loaded(images)) and y.tolist() == labels.tolist()
    # An incomplete torchvision layout is passed over for a complete .npz one.
    cifar10_files(tmp_path, train)[0][-1].unlink()
    x, y = load_cifar10(tmp_path, train=train)
    assert torch.equal(x, as_loaded(255 - images)) and y.tolist() == ((labels + 1) % 10).tolist()


def test_cifar10_matches_torchvision_reader(tmp_path, small_cifar, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    test = fake_cifar(small_cifar[False], seed=8)
    # torchvision looks the keys up as str: a copy pickled by Python 3 with str keys.
    write_cifar_pickles(tmp_path, False, *test, key=str)
    write_cifar_pickles(tmp_path, True, *fake_cifar(small_cifar[True], seed=9), key=str)
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": list(DATASET_CLASSES["cifar10"])}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # fake files
    reference = torchvision.datasets.CIFAR10(str(tmp_path), train=False, download=False)
    x, y = load_cifar10(tmp_path)
    assert torch.equal(x, as_loaded(reference.data))
    assert y.tolist() == reference.targets
    assert tuple(reference.classes) == DATASET_CLASSES["cifar10"]


@pytest.mark.parametrize("train", [False, True])
def test_cifar10_missing_message(tmp_path, train):
    # Like a partial download: torchvision's folder with batches.meta only.
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as caught:
        load_cifar10(tmp_path, train=train)
    message = str(caught.value)
    pickles, npz = cifar10_files(tmp_path, train)
    for path in pickles + npz:
        assert path.name in message
    assert str(pickles[0].parent) in message and str(npz[0].parent) in message
    assert repr(str(tmp_path)) in message
    assert "download=True" in message and "DATA_ROOT" in message and "--data-root" in message
    assert ("training" if train else "test") in message


def test_cifar10_missing_message_names_only_missing_files(tmp_path, small_cifar):
    images, labels = fake_cifar(10, seed=10)
    write_cifar_npz(tmp_path, True, images, labels, seed=11)
    cifar10_files(tmp_path, True)[1][2].unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: train_2\.npz\)"):
        load_cifar10(tmp_path, train=True)


def test_cifar10_download_delegates_to_torchvision(tmp_path, small_cifar, monkeypatch):
    """download=True hands the data root to torchvision's CIFAR10 (no network here)."""
    torchvision = pytest.importorskip("torchvision")
    splits = {False: fake_cifar(6, seed=12), True: fake_cifar(10, seed=13)}
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            for split, (images, labels) in splits.items():  # torchvision extracts both splits
                write_cifar_pickles(Path(root), split, images, labels, key=bytes_key)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    x, y = load_cifar10(tmp_path, train=False, download=True)
    assert calls == [(str(tmp_path), False, True)]
    assert torch.equal(x, as_loaded(splits[False][0])) and y.tolist() == splits[False][1].tolist()
    # Once the files exist, torchvision is not called again; nor when the .npz layout holds the split.
    load_cifar10(tmp_path, train=True, download=True)
    write_cifar_npz(tmp_path / "npz", False, *splits[False], seed=14)
    load_cifar10(tmp_path / "npz", download=True)
    assert len(calls) == 1


def test_cifar10_download_not_where_expected(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, train, download: None)
    with pytest.raises(FileNotFoundError, match=r"CIFAR10\(.*download=True\) returned, but the files are not where"):
        load_cifar10(tmp_path, download=True)


def test_cifar10_counts_checked(tmp_path):
    images, labels = fake_cifar(6, seed=15)
    write_cifar_pickles(tmp_path / "pickles", False, images, labels, key=bytes_key)
    with pytest.raises(ValueError, match=r"test split has 10000 images, but the files hold 6 \(test_batch 6\)"):
        load_cifar10(tmp_path / "pickles")
    images, labels = fake_cifar(10, seed=16)
    write_cifar_npz(tmp_path / "npz", True, images, labels, seed=17)
    expected = r"has 50000 images, but the files hold 10 \(train_0\.npz 2, .*train_4\.npz 2\)"
    with pytest.raises(ValueError, match=expected):
        load_cifar10(tmp_path / "npz", train=True)


# What test_batch holds, made from the rows (N, 3072) and label list of six
# valid images, and the error expected.
CORRUPT_BATCHES = {
    "truncated": (
        lambda rows, labels: pickle.dumps({b"data": rows, b"labels": labels})[:-40],
        r"test_batch: cannot read the CIFAR-10 batch \(.*\); the download may be corrupt",
    ),
    "not a dict": (
        lambda rows, labels: pickle.dumps([rows, labels]),
        r"test_batch: holds a list, expected a CIFAR-10 batch",
    ),
    "no labels": (
        lambda rows, labels: pickle.dumps({b"data": rows}),
        r"test_batch: the batch has no 'labels'",
    ),
    "rows too short": (
        lambda rows, labels: pickle.dumps({b"data": rows[:, :-1], b"labels": labels}),
        r"test_batch: 'data' is uint8 of shape \(6, 3071\), expected uint8 of shape \(N, 3072\)",
    ),
    "float rows": (
        lambda rows, labels: pickle.dumps({b"data": rows / 255, b"labels": labels}),
        r"test_batch: 'data' is float64 of shape \(6, 3072\)",
    ),
    "label 10": (
        lambda rows, labels: pickle.dumps({b"data": rows, b"labels": [10] + labels[1:]}),
        r"test_batch: label 10 is not a class index 0\.\.9",
    ),
    "labels short": (
        lambda rows, labels: pickle.dumps({b"data": rows, b"labels": labels[:5]}),
        r"test_batch: 6 images but labels of shape \(5,\)",
    ),
    # Unpickling calls what the file names: only numpy's array rebuilders may be named.
    "foreign object": (
        lambda rows, labels: pickle.dumps({b"data": collections.OrderedDict(), b"labels": labels}),
        r"test_batch: cannot read .*refers to collections\.OrderedDict, which a CIFAR-10 batch never holds",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_BATCHES))
def test_cifar10_corrupt_pickles(tmp_path, small_cifar, case):
    make, error = CORRUPT_BATCHES[case]
    images, labels = fake_cifar(6, seed=18)
    path = cifar10_files(tmp_path, False)[0][0]
    path.parent.mkdir()
    path.write_bytes(make(images.transpose(0, 3, 1, 2).reshape(6, 3072), labels.tolist()))
    with pytest.raises(ValueError, match=error):
        load_cifar10(tmp_path)


def write_npz_arrays(path: Path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


# Changes to the arrays of a valid six-image test.npz (None: left out), and the error expected.
BAD_NPZ_ARRAYS = {
    "no orig_index": (
        lambda images: {"orig_index": None},
        r"test\.npz: no array 'orig_index' in the archive \(it has \['data', 'labels'\]\)",
    ),
    "CHW data": (
        lambda images: {"data": images.transpose(0, 3, 1, 2)},
        r"test\.npz: 'data' is uint8 of shape \(6, 3, 32, 32\), expected uint8 of shape \(N, 32, 32, 3\)",
    ),
    "float data": (
        lambda images: {"data": images / 255},
        r"test\.npz: 'data' is float64 of shape \(6, 32, 32, 3\)",
    ),
    "label -1": (
        lambda images: {"labels": np.array([0, 1, 2, 3, 4, -1])},
        r"test\.npz: label -1 is not a class index 0\.\.9",
    ),
    "float labels": (
        lambda images: {"labels": np.zeros(6)},
        r"test\.npz: labels have dtype float64, expected integers",
    ),
    "float orig_index": (
        lambda images: {"orig_index": np.arange(6.0)},
        r"test\.npz: 'orig_index' is float64 of shape \(6,\), expected integers",
    ),
    "short orig_index": (
        lambda images: {"orig_index": np.arange(5)},
        r"test\.npz: 'orig_index' is int64 of shape \(5,\), expected integers of shape \(6,\)",
    ),
    "orig_index out of range": (
        lambda images: {"orig_index": np.array([0, 1, 2, 3, 4, 6])},
        r"test\.npz: orig_index 6 is outside 0\.\.5 \(1 such rows\)",
    ),
    "orig_index repeated": (
        lambda images: {"orig_index": np.array([0, 1, 2, 2, 4, 5])},
        r"test\.npz: orig_index 2 appears 2 times",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ_ARRAYS))
def test_cifar10_bad_npz_arrays(tmp_path, small_cifar, case):
    change, error = BAD_NPZ_ARRAYS[case]
    images, labels = fake_cifar(6, seed=19)
    arrays = {"data": images, "labels": labels, "orig_index": np.arange(6), **change(images)}
    write_npz_arrays(cifar10_files(tmp_path, False)[1][0], **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ValueError, match=error):
        load_cifar10(tmp_path)


def test_cifar10_orig_index_repeated_across_files(tmp_path, small_cifar):
    images, labels = fake_cifar(10, seed=20)
    files = cifar10_files(tmp_path, True)[1]
    for k, path in enumerate(files):
        rows = np.array([2 * k, 2 * k + 1])
        write_npz_arrays(path, data=images[rows], labels=labels[rows], orig_index=rows)
    load_cifar10(tmp_path, train=True)  # a valid permutation, spread over the files
    write_npz_arrays(files[3], data=images[6:8], labels=labels[6:8], orig_index=np.array([6, 1]))
    with pytest.raises(ValueError, match=r"train_0\.npz, .*train_3\.npz: orig_index 1 appears 2 times"):
        load_cifar10(tmp_path, train=True)


@pytest.mark.parametrize("content", [b"not an archive", b"PK\x03\x04 truncated"])
def test_cifar10_unreadable_npz(tmp_path, small_cifar, content):
    path = cifar10_files(tmp_path, False)[1][0]
    path.parent.mkdir()
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"test\.npz: cannot read the \.npz archive"):
        load_cifar10(tmp_path)


def test_cifar10_corrupt_archive_member(tmp_path, small_cifar):
    images, labels = fake_cifar(6, seed=21)
    path = cifar10_files(tmp_path, False)[1][0]
    path.parent.mkdir()
    np.savez_compressed(path, data=images, labels=labels, orig_index=np.arange(6))
    content = bytearray(path.read_bytes())
    content[200:260] = bytes(60)  # inside the compressed 'data' member
    path.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"test\.npz: cannot read the \.npz archive"):
        load_cifar10(tmp_path)


# Uniform entry points and the cache -------------------------------------------


def test_dataset_tables_agree():
    assert tuple(DATASET_SHAPES) == tuple(DATASET_CLASSES) == DATASET_NAMES
    assert all(len(classes) == 10 for classes in DATASET_CLASSES.values())


def test_load_dataset_by_name(fake_root, small_cifar):
    root = fake_root[0]
    write_cifar_npz(root, False, *fake_cifar(6, seed=22), seed=23)
    for name, loader in (("mnist", load_mnist), ("cifar10", load_cifar10)):
        x, y = load_dataset(name, root)
        expected_x, expected_y = loader(root)
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
        assert tuple(x.shape[1:]) == DATASET_SHAPES[name]
    assert load_dataset("mnist", root, train=True)[0].shape == (5, 1, 28, 28)


@pytest.mark.parametrize("name", ["MNIST", "cifar-10", "cifar100", "", None])
def test_unknown_dataset_name(tmp_path, name):
    expected = rf"dataset name {re.escape(repr(name))} is unknown; allowed: 'mnist', 'cifar10'"
    for call in (lambda: load_dataset(name, tmp_path), lambda: test_subset(name, tmp_path, 1)):
        with pytest.raises(ValueError, match=expected):
            call()


def test_cifar10_no_data_root():
    with pytest.raises(ValueError, match="data_root must be given .*'cifar-10-batches-py' or 'cifar10-png'"):
        load_cifar10("")


def test_cifar10_test_subset(tmp_path, small_cifar):
    images, labels = fake_cifar(6, seed=24)
    write_cifar_npz(tmp_path, False, images, labels, seed=25)
    x, y = test_subset("cifar10", tmp_path, 4, start=2)
    assert torch.equal(x, as_loaded(images[2:6])) and y.tolist() == labels[2:6].tolist()
    x[:] = 0  # a copy: later calls are unaffected
    assert torch.equal(test_subset("cifar10", tmp_path, 4, start=2)[0], as_loaded(images[2:6]))
    with pytest.raises(ValueError, match="up to index 6, but the cifar10 test set has 6"):
        test_subset("cifar10", tmp_path, 5, start=2)
    with pytest.raises(ValueError, match=r"n=0 is invalid: it must be an integer >= 1"):
        test_subset("cifar10", tmp_path, 0)
    with pytest.raises(ValueError, match=r"start=-1 is invalid: it must be an integer >= 0"):
        test_subset("cifar10", tmp_path, 1, start=-1)


def test_decoded_split_is_cached_until_a_file_changes(tmp_path, small_cifar, monkeypatch):
    images, labels = fake_cifar(6, seed=26)
    path = cifar10_files(tmp_path, False)[1][0]
    write_npz_arrays(path, data=images, labels=labels, orig_index=np.arange(6))
    x, y = load_cifar10(tmp_path)
    x += 1  # the caller's copy
    y[:] = -1
    (tmp_path / "sub").mkdir()

    def no_reading(*args, **kwargs):
        raise AssertionError("np.load called: the decoded split was not reused")

    with monkeypatch.context() as patch:
        patch.setattr(np, "load", no_reading)
        x, y = load_cifar10(str(tmp_path))  # another spelling of the same root
        assert torch.equal(x, as_loaded(images)) and y.tolist() == labels.tolist()
        assert torch.equal(test_subset("cifar10", tmp_path / "sub" / "..", 2)[0], as_loaded(images[:2]))
    # Rewritten in place, same size, a later modification time: decoded again.
    status = path.stat()
    write_npz_arrays(path, data=255 - images, labels=labels, orig_index=np.arange(6))
    assert path.stat().st_size == status.st_size
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert torch.equal(load_cifar10(tmp_path)[0], as_loaded(255 - images))


def _real_data_root() -> str | None:
    root = os.environ.get("DATA_ROOT")
    if not root:
        return None
    return root


@pytest.mark.slow
def test_real_mnist_test_set():
    root = _real_data_root()
    if root is None:
        pytest.skip("DATA_ROOT is not set: point it at a data root containing MNIST/raw to load real MNIST")
    images_path, labels_path = mnist_files(root, train=False)
    present = all(p.is_file() or p.with_name(p.name + ".gz").is_file() for p in (images_path, labels_path))
    if not present:
        pytest.skip(f"DATA_ROOT={root!r} has no MNIST test files ({images_path}[.gz], {labels_path}[.gz])")
    x, y = load_mnist(root, train=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(float(x.mean()) - 0.1325) < 1e-3  # the test set's mean pixel
    sx, sy = mnist_test_subset(root, 100)
    assert torch.equal(sx, x[:100]) and torch.equal(sy, y[:100])


# MD5 of the CIFAR-10 test pixels in torchvision's order, as (10000, 32, 32, 3) uint8, C order.
CIFAR10_TEST_PIXELS_MD5 = "6d2714505047e13831cd876923568712"


@pytest.mark.slow
def test_real_cifar10_test_set():
    root = _real_data_root()
    if root is None:
        pytest.skip("DATA_ROOT is not set: point it at a data root containing cifar-10-batches-py or cifar10-png")
    pickles, npz = cifar10_files(root, train=False)
    if not (all(p.is_file() for p in pickles) or all(p.is_file() for p in npz)):
        pytest.skip(f"DATA_ROOT={root!r} has no CIFAR-10 test files ({pickles[0]} or {npz[0]})")
    x, y = load_cifar10(root, train=False)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [1000] * 10
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # cat, ship, ship, airplane, frog, ...
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    assert hashlib.md5(pixels.tobytes()).hexdigest() == CIFAR10_TEST_PIXELS_MD5
    sx, sy = test_subset("cifar10", root, 100, start=9900)
    assert torch.equal(sx, x[9900:]) and torch.equal(sy, y[9900:])


def test_real_cifar10_class_names():
    root = _real_data_root()
    if root is None:
        pytest.skip("DATA_ROOT is not set: point it at a data root containing cifar-10-batches-py/batches.meta")
    meta = Path(root) / "cifar-10-batches-py" / "batches.meta"
    if not meta.is_file():
        pytest.skip(f"DATA_ROOT={root!r} has no {meta}")
    with meta.open("rb") as handle:
        names = pickle.load(handle, encoding="bytes")[b"label_names"]
    assert tuple(name.decode() for name in names) == DATASET_CLASSES["cifar10"]
