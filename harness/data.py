"""Data sets for the benchmark: MNIST and CIFAR-10 from a data root given by the caller.

The data root is never guessed: every function takes it as an argument.
Scripts may default it to the ``DATA_ROOT`` environment variable.

MNIST is read in torchvision's layout
(``<data_root>/MNIST/raw/t10k-images-idx3-ubyte[.gz]`` and so on). The raw
idx files are read directly, in either the ``.gz`` or the extracted form, so
a read-only folder holding only the archives works (torchvision's
:class:`~torchvision.datasets.MNIST` insists on the extracted files).

CIFAR-10 is read from either of two layouts; torchvision's wins when both
hold the split:

* torchvision's python pickles,
  ``<data_root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``, read
  directly (no checksum, no ``batches.meta`` needed);
* ``.npz`` archives, ``<data_root>/cifar10-png/{test,train_0..train_4}.npz``,
  each with arrays ``data`` (uint8, N x 32 x 32 x 3, RGB), ``labels`` and
  ``orig_index`` (each image's position in torchvision's order of its split).
  Their rows may come in any order: sorting on ``orig_index`` restores
  torchvision's.

torchvision is used only to download, when asked to, into its own layout.

Every loader returns a split in torchvision's order: float32 images
``(N, C, H, W)`` in [0, 1] and int64 labels. The decoded split is kept for
the life of the process, keyed by the resolved path, modification time, size
and inode of each file read, so that repeated calls (the attack harness calls
:func:`test_subset` many times) read the files once. Each call returns new
tensors, which the caller may modify.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .vocabulary import DATASETS

__all__ = [
    "CIFAR10_SPLIT_SIZES",
    "DATASET_CLASSES",
    "DATASET_NAMES",
    "DATASET_SHAPES",
    "MNIST_SHAPE",
    "cifar10_files",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "mnist_files",
    "mnist_test_subset",
    "read_idx",
    "test_subset",
]

DATASET_NAMES = tuple(DATASETS)
"""Names accepted by :func:`load_dataset` and :func:`test_subset`."""

DATASET_SHAPES = {name: facts.shape for name, facts in DATASETS.items()}
"""Shape ``(C, H, W)`` of one image, per dataset name (from :data:`harness.vocabulary.DATASETS`)."""

MNIST_SHAPE = DATASET_SHAPES["mnist"][1:]
"""Height and width of an MNIST image."""

DATASET_CLASSES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
"""Class names per dataset name: label ``k`` is ``DATASET_CLASSES[name][k]``."""

CIFAR10_SPLIT_SIZES = {"test": 10000, "train": 50000}
"""Number of images in each CIFAR-10 split; :func:`load_cifar10` rejects any other count."""

# Both datasets have ten classes, labelled 0..9.
_NUM_CLASSES = 10

# idx format: two zero bytes, a type code (0x08 = unsigned byte), the number
# of dimensions, then one big-endian uint32 per dimension.
_IMAGES_MAGIC = 0x00000803  # ubyte, 3 dimensions (N, rows, cols)
_LABELS_MAGIC = 0x00000801  # ubyte, 1 dimension (N,)

_CIFAR10_PICKLE_FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder
_CIFAR10_NPZ_FOLDER = "cifar10-png"
_CIFAR10_PIXELS = 3 * 32 * 32  # one pickle row: the red, green and blue 32 x 32 planes
_NPZ_ARRAYS = ("data", "labels", "orig_index")

# What a pickled numpy array refers to: _reconstruct (pickle protocols 0-4, as
# in the original Python 2 files) or _frombuffer (protocol 5), under numpy 1's
# module names or numpy 2's. The objects are taken from numpy's own reducers
# so that they are right for the numpy installed.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(1).__reduce_ex__(5)[0]
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
}


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


def cifar10_files(data_root: str | os.PathLike, train: bool = False) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Where the files of one CIFAR-10 split are expected, in each layout.

    Parameters
    ----------
    data_root : str or os.PathLike
        Root folder: the one that contains ``cifar-10-batches-py`` or
        ``cifar10-png``.
    train : bool, default False
        The training split (50000 images) instead of the test split (10000).

    Returns
    -------
    pickles : tuple of pathlib.Path
        torchvision's layout: ``<data_root>/cifar-10-batches-py/test_batch``,
        or ``data_batch_1`` ... ``data_batch_5`` for the training split.
    npz : tuple of pathlib.Path
        The ``.npz`` layout: ``<data_root>/cifar10-png/test.npz``, or
        ``train_0.npz`` ... ``train_4.npz`` for the training split.
    """
    if train:
        pickle_names = tuple(f"data_batch_{k}" for k in range(1, 6))
        npz_names = tuple(f"train_{k}.npz" for k in range(5))
    else:
        pickle_names, npz_names = ("test_batch",), ("test.npz",)
    root = Path(data_root)
    return (
        tuple(root / _CIFAR10_PICKLE_FOLDER / name for name in pickle_names),
        tuple(root / _CIFAR10_NPZ_FOLDER / name for name in npz_names),
    )


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


def _checked_labels(labels, count: int, source: str) -> np.ndarray:
    """``labels`` as int64, after checking there is one integer in 0..9 per image."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ValueError(f"{source}: {count} images but labels of shape {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels have dtype {labels.dtype}, expected integers 0..9")
    outside = labels[(labels < 0) | (labels >= _NUM_CLASSES)]
    if outside.size:
        raise ValueError(f"{source}: label {outside[0]} is not a class index 0..9 ({outside.size} such labels)")
    return labels.astype(np.int64)


def _read_mnist(files: tuple[Path, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST images ``(N, 1, 28, 28)`` and labels from an idx image file and an idx label file."""
    images_file, labels_file = files
    images = read_idx(images_file, _IMAGES_MAGIC)
    labels = read_idx(labels_file, _LABELS_MAGIC)
    source = f"MNIST {split} files {images_file} / {labels_file}"
    if tuple(images.shape[1:]) != MNIST_SHAPE:
        raise ValueError(f"{source}: images have shape {tuple(images.shape)}, expected (N, 28, 28)")
    return images[:, np.newaxis], _checked_labels(labels, images.shape[0], source)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain Python data and numpy arrays, nothing else.

    A data folder must not be able to run code, which a plain
    :func:`pickle.load` allows: it calls whatever the file names.
    """

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds") from None


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``(N, 3072)`` uint8 rows and the labels of one of torchvision's CIFAR-10 pickles."""
    try:
        with path.open("rb") as handle:
            # The original files were pickled by Python 2: their strings are bytes.
            batch = _BatchUnpickler(handle, encoding="bytes").load()
    except OSError:
        raise
    except Exception as error:  # a corrupt pickle fails in many ways: EOFError, UnpicklingError, ValueError...
        raise ValueError(
            f"{path}: cannot read the CIFAR-10 batch ({type(error).__name__}: {error}); the download may be corrupt"
        ) from error
    if not isinstance(batch, dict):
        raise ValueError(
            f"{path}: holds a {type(batch).__name__}, expected a CIFAR-10 batch (a dict with 'data' and 'labels')"
        )
    # Python 2 wrote the keys as bytes; a copy pickled again by Python 3 has str keys, which torchvision reads too.
    batch = {key.decode("latin-1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        raise ValueError(
            f"{path}: the batch has no {' or '.join(map(repr, missing))} (its keys: {sorted(map(str, batch))}); "
            "not a CIFAR-10 batch"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_PIXELS:
        found = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise ValueError(
            f"{path}: 'data' is {found}, expected uint8 of shape (N, {_CIFAR10_PIXELS}) "
            "(per image, the red, green and blue 32 x 32 planes)"
        )
    return data, _checked_labels(batch["labels"], data.shape[0], str(path))


def _check_cifar10_count(files: tuple[Path, ...], counts: list[int], split: str) -> None:
    expected = CIFAR10_SPLIT_SIZES[split]
    if sum(counts) != expected:
        held = ", ".join(f"{path.name} {count}" for path, count in zip(files, counts))
        raise ValueError(
            f"{files[0].parent}: the CIFAR-10 {split} split has {expected} images, but the files hold {sum(counts)} "
            f"({held}); a file is truncated or belongs to another split"
        )


def _read_cifar10_pickles(files: tuple[Path, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images ``(N, 3, 32, 32)`` and labels from torchvision's pickles, in file order."""
    batches = [_read_cifar10_batch(path) for path in files]
    _check_cifar10_count(files, [len(labels) for _, labels in batches], split)
    images = np.concatenate([data for data, _ in batches]).reshape(-1, *DATASET_SHAPES["cifar10"])
    return images, np.concatenate([labels for _, labels in batches])


def _read_npz_part(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data``, ``labels`` and ``orig_index`` of one CIFAR-10 ``.npz`` file, checked."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            arrays = {name: archive[name] for name in _NPZ_ARRAYS if name in names}
    except OSError:
        raise
    except Exception as error:  # a corrupt archive fails in many ways: BadZipFile, zlib.error, ValueError...
        raise ValueError(
            f"{path}: cannot read the .npz archive ({type(error).__name__}: {error}); the file may be corrupt"
        ) from error
    missing = [name for name in _NPZ_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(
            f"{path}: no array {', '.join(map(repr, missing))} in the archive (it has {names}); "
            f"expected {', '.join(map(repr, _NPZ_ARRAYS))}"
        )
    data, orig_index = arrays["data"], arrays["orig_index"]
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3):
        raise ValueError(
            f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, 32, 32, 3) (HWC, RGB)"
        )
    labels = _checked_labels(arrays["labels"], data.shape[0], str(path))
    if orig_index.dtype.kind not in "iu" or orig_index.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: 'orig_index' is {orig_index.dtype} of shape {orig_index.shape}, "
            f"expected integers of shape ({data.shape[0]},), one per image"
        )
    return data, labels, orig_index.astype(np.int64)


def _torchvision_order(orig_index: np.ndarray, files: tuple[Path, ...], counts: list[int]) -> np.ndarray:
    """The row order that sorts ``orig_index``, after checking it is a permutation of 0..N-1."""
    total = orig_index.shape[0]
    owner = np.repeat(np.arange(len(files)), counts)  # the file each row comes from, for the messages
    outside = np.flatnonzero((orig_index < 0) | (orig_index >= total))
    if outside.size:
        row = outside[0]
        raise ValueError(
            f"{files[owner[row]]}: orig_index {orig_index[row]} is outside 0..{total - 1} ({outside.size} such rows); "
            f"orig_index must number the {total} images of the split in torchvision's order, each once"
        )
    order = np.argsort(orig_index, kind="stable")
    # All N values lie in 0..N-1, so without a repeat they are a permutation.
    repeats = np.flatnonzero(np.diff(orig_index[order]) == 0)
    if repeats.size:
        value = orig_index[order[repeats[0]]]
        rows = np.flatnonzero(orig_index == value)
        holders = ", ".join(dict.fromkeys(str(files[owner[row]]) for row in rows))
        raise ValueError(
            f"{holders}: orig_index {value} appears {rows.size} times; orig_index must number the {total} images "
            f"of the split in torchvision's order, each once"
        )
    return order


def _read_cifar10_npz(files: tuple[Path, ...], split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images ``(N, 3, 32, 32)`` and labels from the ``.npz`` files, in torchvision's order."""
    parts = [_read_npz_part(path) for path in files]
    counts = [len(labels) for _, labels, _ in parts]
    _check_cifar10_count(files, counts, split)
    order = _torchvision_order(np.concatenate([orig_index for _, _, orig_index in parts]), files, counts)
    images = np.concatenate([data for data, _, _ in parts])[order]
    labels = np.concatenate([labels for _, labels, _ in parts])[order]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels  # HWC rows to CHW


def _find_mnist(data_root: str | os.PathLike, train: bool) -> tuple[Callable, tuple[Path, ...]] | None:
    found = tuple(_existing(path) for path in mnist_files(data_root, train))
    return None if None in found else (_read_mnist, found)


def _find_cifar10(data_root: str | os.PathLike, train: bool) -> tuple[Callable, tuple[Path, ...]] | None:
    pickles, npz = cifar10_files(data_root, train)
    # A layout counts only when it holds every file of the split: the data
    # root may hold a partial download (say, batches.meta alone).
    if all(path.is_file() for path in pickles):
        return _read_cifar10_pickles, pickles
    if all(path.is_file() for path in npz):
        return _read_cifar10_npz, npz
    return None


_HOW_TO_FIX = (
    "To fix it: pass download=True to fetch it with torchvision into that data root (needs internet), "
    "or pass the data root that contains {contents} (scripts: --data-root PATH or the DATA_ROOT environment variable)."
)


def _mnist_missing_message(data_root: str | os.PathLike, train: bool) -> str:
    split = "training" if train else "test"
    missing = [path for path in mnist_files(data_root, train) if _existing(path) is None]
    expected = "\n".join(f"  {path}[.gz]" for path in missing)
    return (
        f"MNIST {split} data not found under data_root={str(data_root)!r}.\n"
        f"Expected (plain or .gz, torchvision's raw layout):\n{expected}\n"
        + _HOW_TO_FIX.format(contents="the 'MNIST' folder")
    )


def _cifar10_missing_message(data_root: str | os.PathLike, train: bool) -> str:
    split = "training" if train else "test"
    layouts = []
    for description, files in zip(("torchvision's python pickles", ".npz archives"), cifar10_files(data_root, train)):
        missing = [path.name for path in files if not path.is_file()]
        layouts.append(
            f"  {description} in {files[0].parent}: {', '.join(path.name for path in files)} "
            f"(missing: {', '.join(missing)})"
        )
    return (
        f"CIFAR-10 {split} data not found under data_root={str(data_root)!r}.\n"
        "Expected one of these layouts, complete:\n" + "\n".join(layouts) + "\n"
        + _HOW_TO_FIX.format(contents="'cifar-10-batches-py' or 'cifar10-png'")
    )


@dataclass(frozen=True)
class _Dataset:
    """How one dataset is found on disk, explained when missing, and downloaded."""

    root_contents: str  # what the data root holds, for the message when none is given
    find: Callable[[str | os.PathLike, bool], tuple[Callable, tuple[Path, ...]] | None]
    missing_message: Callable[[str | os.PathLike, bool], str]
    torchvision_class: str  # the torchvision.datasets class that downloads it


_DATASETS = {
    "mnist": _Dataset("'MNIST/raw'", _find_mnist, _mnist_missing_message, "MNIST"),
    "cifar10": _Dataset("'cifar-10-batches-py' or 'cifar10-png'", _find_cifar10, _cifar10_missing_message, "CIFAR10"),
}


def _file_state(path: Path) -> tuple[str, int, int, int]:
    """Resolved path, modification time (ns), size and inode: a file rewritten or replaced changes it."""
    resolved = path.resolve()
    status = resolved.stat()
    return str(resolved), status.st_mtime_ns, status.st_size, status.st_ino


@functools.lru_cache(maxsize=4)  # both splits of both datasets
def _decoded_split(reader: Callable, split: str, file_states: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``reader``'s arrays for the files of ``file_states`` (see :func:`_file_state`), made read-only."""
    images, labels = reader(tuple(Path(state[0]) for state in file_states), split)
    # Shared by every later call: only copies leave this module.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _split_arrays(
    name: str, data_root: str | os.PathLike, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A split as read-only uint8 images ``(N, C, H, W)`` and int64 labels, decoded once per process."""
    if not isinstance(name, str) or name not in _DATASETS:
        raise ValueError(f"dataset name {name!r} is unknown; allowed: {', '.join(map(repr, DATASET_NAMES))}")
    dataset = _DATASETS[name]
    if data_root is None or str(data_root) == "":
        raise ValueError(f"data_root must be given (the folder that contains {dataset.root_contents}); none was passed")
    located = dataset.find(data_root, train)
    if located is None:
        if not download:
            raise FileNotFoundError(dataset.missing_message(data_root, train))
        import torchvision  # only needed to download

        downloader = f"torchvision.datasets.{dataset.torchvision_class}({os.fspath(data_root)!r}, download=True)"
        getattr(torchvision.datasets, dataset.torchvision_class)(os.fspath(data_root), train=train, download=True)
        located = dataset.find(data_root, train)
        if located is None:
            raise FileNotFoundError(
                f"{downloader} returned, but the files are not where this module reads them.\n"
                + dataset.missing_message(data_root, train)
            )
    reader, files = located
    return _decoded_split(reader, "train" if train else "test", tuple(_file_state(path) for path in files))


def _as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """New tensors, float32 ``pixel / 255`` and int64, that the caller may modify."""
    return torch.from_numpy(images.astype(np.float32)).div_(255.0), torch.from_numpy(labels.copy())


def load_dataset(
    name: str, data_root: str | os.PathLike, train: bool = False, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of a dataset by name, in torchvision's order.

    Parameters
    ----------
    name : {"mnist", "cifar10"}
        The dataset (see :data:`DATASET_NAMES`).
    data_root : str or os.PathLike
        Root folder holding the dataset: see :func:`load_mnist` and
        :func:`load_cifar10` for the layouts read.
    train : bool, default False
        Load the training split instead of the test split.
    download : bool, default False
        When the files are missing, download them with torchvision into
        ``data_root`` instead of raising.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, *DATASET_SHAPES[name])``, values ``pixel / 255``
        in [0, 1].
    labels : torch.Tensor
        int64, shape ``(N,)``, class indices 0..9 (names in
        :data:`DATASET_CLASSES`).

    Raises
    ------
    ValueError
        ``name`` is not one of :data:`DATASET_NAMES` (the message lists
        them), no ``data_root`` is given, or a file is corrupt or
        inconsistent (the message names it).
    FileNotFoundError
        The files are missing and ``download`` is False; the message names
        the expected files, the data root given and how to fix it.

    Examples
    --------
    >>> images, labels = load_dataset("cifar10", os.environ["DATA_ROOT"])  # doctest: +SKIP
    >>> images.shape, labels.shape                                         # doctest: +SKIP
    (torch.Size([10000, 3, 32, 32]), torch.Size([10000]))
    """
    return _as_tensors(*_split_arrays(name, data_root, train, download))


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
    return load_dataset("mnist", data_root, train, download)


def load_cifar10(
    data_root: str | os.PathLike, train: bool = False, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR-10 split as tensors, in torchvision's order.

    Parameters
    ----------
    data_root : str or os.PathLike
        Root folder holding one of two layouts (see :func:`cifar10_files`):
        torchvision's pickles in ``<data_root>/cifar-10-batches-py``, or
        ``.npz`` archives in ``<data_root>/cifar10-png`` whose rows are put
        back in torchvision's order by sorting on their ``orig_index``.
        torchvision's layout is used when both hold every file of the split.
    train : bool, default False
        Load the 50000 training images instead of the 10000 test images.
    download : bool, default False
        When neither layout holds the split, download it with
        :class:`torchvision.datasets.CIFAR10` into ``data_root`` (exactly
        where torchvision puts it) instead of raising.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(N, 3, 32, 32)`` (RGB), values ``pixel / 255`` in
        [0, 1].
    labels : torch.Tensor
        int64, shape ``(N,)``, classes 0..9 in the order of
        ``DATASET_CLASSES["cifar10"]``.

    Raises
    ------
    FileNotFoundError
        Neither layout holds the split and ``download`` is False; the message
        names both layouts, the missing files, the data root given and how
        to fix it.
    ValueError
        A file is corrupt or of the wrong shape or type, a label is outside
        0..9, the split does not hold :data:`CIFAR10_SPLIT_SIZES` images, or
        the ``orig_index`` of the ``.npz`` files is not a permutation of
        0..N-1; the message names the file.

    Examples
    --------
    >>> images, labels = load_cifar10(os.environ["DATA_ROOT"])  # doctest: +SKIP
    >>> images.shape, labels.shape                               # doctest: +SKIP
    (torch.Size([10000, 3, 32, 32]), torch.Size([10000]))
    """
    return load_dataset("cifar10", data_root, train, download)


def test_subset(
    name: str, data_root: str | os.PathLike, n: int, start: int = 0, *, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images ``start, ..., start + n - 1`` of a dataset, in torchvision's order (deterministic).

    Parameters
    ----------
    name : {"mnist", "cifar10"}
        The dataset, as in :func:`load_dataset`.
    data_root : str or os.PathLike
        As in :func:`load_dataset`.
    n : int
        Number of images, ``n >= 1``.
    start : int, default 0
        Index of the first image, ``start >= 0``; ``start + n`` must not
        exceed the number of test images (10000 for both datasets).
    download : bool, default False
        As in :func:`load_dataset`.

    Returns
    -------
    images : torch.Tensor
        float32, shape ``(n, *DATASET_SHAPES[name])``, in [0, 1] (a copy,
        not a view of the whole set).
    labels : torch.Tensor
        int64, shape ``(n,)``.

    Raises
    ------
    ValueError
        ``n`` or ``start`` is out of range, or ``name`` is unknown.
    FileNotFoundError
        As in :func:`load_dataset`.
    """
    for argument, value, low in (("n", n, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{argument}={value!r} is invalid: it must be an integer >= {low}")
    images, labels = _split_arrays(name, data_root, train=False, download=download)
    total = images.shape[0]
    if start + n > total:
        raise ValueError(
            f"start={start} and n={n} ask for images up to index {start + n - 1}, but the {name} test set has {total}"
        )
    return _as_tensors(images[start : start + n], labels[start : start + n])


# Its name would make pytest collect it as a test from any test module that imports it.
test_subset.__test__ = False


def mnist_test_subset(
    data_root: str | os.PathLike, n: int, start: int = 0, *, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test images ``start, ..., start + n - 1``, in file order (deterministic).

    ``test_subset("mnist", data_root, n, start, download=download)``; see
    :func:`test_subset`.

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
    return test_subset("mnist", data_root, n, start, download=download)
