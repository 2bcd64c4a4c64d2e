"""Data sets for the benchmark: MNIST from a data root given by the caller.

The data root is never guessed: every function takes it as an argument, in
torchvision's layout (``<data_root>/MNIST/raw/t10k-images-idx3-ubyte[.gz]``
and so on). Scripts may default it to the ``DATA_ROOT`` environment variable.

The raw idx files are read directly when they are present, in either the
``.gz`` or the extracted form, so a read-only folder holding only the
archives works (torchvision's :class:`~torchvision.datasets.MNIST` insists on
the extracted files). torchvision is used only to download, when asked to.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["MNIST_SHAPE", "load_mnist", "mnist_files", "mnist_test_subset", "read_idx"]

MNIST_SHAPE = (28, 28)
"""Height and width of an MNIST image."""

# idx format: two zero bytes, a type code (0x08 = unsigned byte), the number
# of dimensions, then one big-endian uint32 per dimension.
_IDX_UBYTE = 0x08
_IMAGES_MAGIC = 0x00000803  # ubyte, 3 dimensions (N, rows, cols)
_LABELS_MAGIC = 0x00000801  # ubyte, 1 dimension (N,)


def mnist_files(data_root: str | os.PathLike, train: bool = False) -> tuple[Path, Path]:
    """Where the raw MNIST files of one split are expected, without extension.

    Parameters
    ----------
    data_root : str or os.PathLike
        Root folder in torchvision's layout (the folder that contains ``MNIST``).
    train : bool, default False
        The training split (60000 images) instead of the test split (10000).

    Returns
    -------
    images, labels : pathlib.Path
        ``<data_root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``;
        each may also exist with a ``.gz`` suffix.
    """
    prefix = "train" if train else "t10k"
    raw = Path(data_root) / "MNIST" / "raw"
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


def _existing(path: Path) -> Path | None:
    """``path`` if it is a file, else ``path.gz`` if that is, else None."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    return None


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an unsigned-byte idx file (plain or gzip-compressed).

    Parameters
    ----------
    path : str or os.PathLike
        The file; a name ending in ``.gz`` is decompressed.
    magic : int
        Expected magic number: ``0x803`` for a 3-D image file, ``0x801`` for
        a 1-D label file.

    Returns
    -------
    numpy.ndarray of uint8
        The array, shaped by the dimensions in the header.

    Raises
    ------
    ValueError
        The file is corrupt, has another magic number (wrong kind of file or
        a non-byte type), or its length does not match its header.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read the idx file ({error}); the download may be corrupt") from error
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an idx file header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(
            f"{path}: idx magic number is {found:#010x}, expected {magic:#010x} "
            f"({'images, 3 dimensions' if magic == _IMAGES_MAGIC else 'labels, 1 dimension'}, unsigned bytes); "
            "the file is not the MNIST file of that name or is corrupt"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated idx header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path}: the header announces shape {shape} ({expected} bytes in all) but the file has {len(data)} bytes; "
            "it is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _missing_message(data_root, train: bool, images: Path, labels: Path, missing: list[Path]) -> str:
    split = "training" if train else "test"
    expected = "\n".join(f"  {p}[.gz]" for p in missing)
    return (
        f"MNIST {split} data not found under data_root={str(data_root)!r}.\n"
        f"Expected (plain or .gz, torchvision's raw layout):\n{expected}\n"
        "To fix it: pass download=True to fetch it with torchvision into that data root (needs internet), "
        "or pass the data root that contains the 'MNIST' folder (scripts: --data-root PATH or the DATA_ROOT "
        "environment variable)."
    )


def load_mnist(
    data_root: str | os.PathLike, train: bool = False, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as tensors.

    Parameters
    ----------
    data_root : str or os.PathLike
        Root folder in torchvision's layout: the files are looked up in
        ``<data_root>/MNIST/raw`` (see :func:`mnist_files`), extracted or as
        ``.gz``. The extracted file is used when both exist.
    train : bool, default False
        Load the 60000 training images instead of the 10000 test images.
    download : bool, default False
        When the files are missing, download them with
        :class:`torchvision.datasets.MNIST` into ``data_root`` (exactly where
        torchvision puts them) instead of raising.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, 1, 28, 28)``, values ``pixel / 255`` in [0, 1].
    labels : torch.Tensor
        int64, shape ``(N,)``, digits 0..9.

    Raises
    ------
    FileNotFoundError
        The files are missing and ``download`` is False; the message names
        the expected files, the data root given and how to fix it.
    ValueError
        A file is corrupt, has the wrong idx magic number or shape, or the
        images and labels disagree in number.

    Examples
    --------
    >>> images, labels = load_mnist(os.environ["DATA_ROOT"])  # doctest: +SKIP
    >>> images.shape, labels.shape                             # doctest: +SKIP
    (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    if data_root is None or str(data_root) == "":
        raise ValueError("data_root must be given (the folder that contains 'MNIST/raw'); none was passed")
    images_path, labels_path = mnist_files(data_root, train)
    found = {p: _existing(p) for p in (images_path, labels_path)}
    missing = [p for p, f in found.items() if f is None]
    if missing:
        if not download:
            raise FileNotFoundError(_missing_message(data_root, train, images_path, labels_path, missing))
        import torchvision  # only needed to download

        dataset = torchvision.datasets.MNIST(os.fspath(data_root), train=train, download=True)
        images = dataset.data.numpy() if isinstance(dataset.data, torch.Tensor) else np.asarray(dataset.data)
        labels = dataset.targets.numpy() if isinstance(dataset.targets, torch.Tensor) else np.asarray(dataset.targets)
        source = f"torchvision.datasets.MNIST({os.fspath(data_root)!r})"
    else:
        images = read_idx(found[images_path], _IMAGES_MAGIC)
        labels = read_idx(found[labels_path], _LABELS_MAGIC)
        source = f"{found[images_path]} / {found[labels_path]}"
    return _to_tensors(images, labels, source)


def _to_tensors(images: np.ndarray, labels: np.ndarray, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if images.ndim != 3 or tuple(images.shape[1:]) != MNIST_SHAPE:
        raise ValueError(f"{source}: images have shape {tuple(images.shape)}, expected (N, 28, 28)")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{source}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{source}: label {int(labels.max())} is not a digit 0..9")
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(np.array(labels, dtype=np.int64))
    return x, y


def mnist_test_subset(
    data_root: str | os.PathLike, n: int, start: int = 0, *, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images ``start, ..., start + n - 1``, in file order (deterministic).

    Parameters
    ----------
    data_root : str or os.PathLike
        As in :func:`load_mnist`.
    n : int
        Number of images, ``n >= 1``.
    start : int, default 0
        Index of the first image, ``start >= 0``; ``start + n`` must not
        exceed the 10000 test images.
    download : bool, default False
        As in :func:`load_mnist`.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(n, 1, 28, 28)``, in [0, 1] (a copy, not a view of
        the whole set).
    labels : torch.Tensor
        int64, shape ``(n,)``.

    Raises
    ------
    ValueError
        ``n`` or ``start`` is out of range.
    FileNotFoundError
        As in :func:`load_mnist`.
    """
    for name, value, low in (("n", n, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: it must be an integer >= {low}")
    images, labels = load_mnist(data_root, train=False, download=download)
    total = images.shape[0]
    if start + n > total:
        raise ValueError(f"start={start} and n={n} ask for images up to index {start + n - 1}, but the test set has {total}")
    return images[start : start + n].clone(), labels[start : start + n].clone()
