"""Tests for harness/data.py: MNIST idx reading from a caller-given data root.

Tiny fake idx data sets are written to ``tmp_path`` in torchvision's raw
layout, plain and gzip-compressed. One test reads the real MNIST test set
when the ``DATA_ROOT`` environment variable points at a data root holding it.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import load_mnist, mnist_files, mnist_test_subset, read_idx

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
