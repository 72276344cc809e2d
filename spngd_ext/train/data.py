"""MNIST-format image datasets (Fashion-MNIST, MNIST, KMNIST) held as in-memory tensors.

The files are the IDX files these datasets ship as (``train-images-idx3-ubyte[.gz]`` and the
three siblings). Reading checks the header and that the payload has exactly the announced size,
so a corrupt or truncated download fails loudly with the file's name instead of training on
garbage.

Where the files live is decided by :func:`find_data_dir`, in this order:

1. an explicit directory (the ``--data-dir`` option),
2. ``$SPNGD_DATA_DIR``,
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package),
4. ``~/.cache/spngd/fashion-mnist``, downloaded there from the Fashion-MNIST mirror when the
   network allows it.

An explicit directory or ``$SPNGD_DATA_DIR`` that lacks the files is an error, not a reason to
look further: the user asked for that directory.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "IdxFormatError",
    "DataNotFoundError",
    "FileSet",
    "Dataset",
    "DATA_DIR_ENV",
    "SYSTEM_DATA_DIR",
    "CACHE_DATA_DIR",
    "FASHION_MNIST_MIRROR",
    "read_idx",
    "write_idx",
    "locate_files",
    "find_data_dir",
    "load_dataset",
]

DATA_DIR_ENV = "SPNGD_DATA_DIR"
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DATA_DIR = Path("~/.cache/spngd/fashion-mnist")
FASHION_MNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOAD_TIMEOUT_S = 10.0

# The four standard file stems shared by MNIST, Fashion-MNIST and KMNIST.
FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(ValueError):
    """An IDX file is corrupt, truncated or not an IDX file at all."""


class DataNotFoundError(FileNotFoundError):
    """No directory with the dataset files was found."""


HOW_TO_GET_DATA = (
    "Get Fashion-MNIST in one of these ways:\n"
    "  * install Debian's package:  sudo apt-get install dataset-fashion-mnist\n"
    f"    (files land in {SYSTEM_DATA_DIR})\n"
    f"  * point {DATA_DIR_ENV} at a directory holding the four IDX files:\n"
    f"      export {DATA_DIR_ENV}=/path/to/fashion-mnist\n"
    "  * pass the directory explicitly:  spngd-train --data-dir /path/to/fashion-mnist\n"
    f"  * or allow network access once, so it is downloaded to {CACHE_DATA_DIR}\n"
    "The directory must contain "
    + ", ".join(f"{stem}[.gz]" for stem in FILE_STEMS.values())
    + " (MNIST and KMNIST in the same format work too)."
)


# --------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head != _GZIP_MAGIC:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except EOFError as exc:  # the compressed stream ends early
        raise IdxFormatError(f"{path}: truncated gzip stream ({exc})") from exc
    except (OSError, gzip.BadGzipFile) as exc:
        raise IdxFormatError(f"{path}: corrupt gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or raw, detected from its first bytes).

    Raises :class:`IdxFormatError` naming the file when the magic number, the dimensions or the
    payload length is wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: bad magic number 0x{data[:4].hex()} (expected 0x0000TTDD with type code "
            f"TT in {{{', '.join(f'{c:02x}' for c in _IDX_DTYPES)}}}); not an IDX file"
        )
    if ndim == 0:
        raise IdxFormatError(f"{path}: header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(f"{path}: header declares {ndim} dimensions but the file ends after {len(data)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in dims):
        raise IdxFormatError(f"{path}: a dimension is zero: {dims}")
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IdxFormatError(
            f"{path}: payload {what}: dims {dims} of {dtype.name} need {expected} bytes, found {actual}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable copy, which torch requires.
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip-compressed when ``compress`` (default: name ends .gz).

    Used by the tests to build tiny datasets, and handy for subsets.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"write_idx: dtype {array.dtype} has no IDX type code")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = array.astype(_IDX_DTYPES[code], copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + payload)
    return path


# --------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSet:
    """Paths of the four IDX files of one dataset directory."""

    train_images: Path
    train_labels: Path
    test_images: Path
    test_labels: Path


def locate_files(directory: str | os.PathLike) -> FileSet | None:
    """The four IDX files in ``directory`` (``.gz`` preferred over raw), or None if any is missing."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        return None
    found: dict[str, Path] = {}
    for key, stem in FILE_STEMS.items():
        for name in (stem + ".gz", stem):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            return None
    return FileSet(**found)


def _missing_files_message(directory: Path) -> str:
    if not directory.is_dir():
        return f"{directory} is not a directory"
    missing = [
        stem
        for stem in FILE_STEMS.values()
        if not (directory / stem).is_file() and not (directory / (stem + ".gz")).is_file()
    ]
    return f"{directory} lacks {', '.join(f'{m}[.gz]' for m in missing)}"


def _download_fashion_mnist(target: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> bool:
    """Download the four gz files into ``target``; False (with nothing half-written) on failure."""
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    for stem in FILE_STEMS.values():
        name = stem + ".gz"
        if (target / name).is_file():
            continue
        # Download to a temporary name and rename, so an interrupted download never looks complete.
        fd, tmp_name = tempfile.mkstemp(dir=target, prefix=".partial-")
        try:
            with urllib.request.urlopen(FASHION_MNIST_MIRROR + name, timeout=timeout) as resp:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(resp, out)
            read_idx(tmp_name)  # validate before accepting
            os.replace(tmp_name, target / name)
        except (urllib.error.URLError, OSError, TimeoutError, IdxFormatError, ValueError):
            Path(tmp_name).unlink(missing_ok=True)
            return False
    return True


def find_data_dir(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The directory holding the dataset, searched in the order given in the module docstring.

    ``download=False`` skips the network step (tests, offline machines). Raises
    :class:`DataNotFoundError` with instructions when nothing is found.
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if locate_files(directory) is None:
            raise DataNotFoundError(f"--data-dir: {_missing_files_message(directory)}.\n{HOW_TO_GET_DATA}")
        return directory
    env_value = os.environ.get(DATA_DIR_ENV)
    if env_value:
        directory = Path(env_value).expanduser()
        if locate_files(directory) is None:
            raise DataNotFoundError(f"${DATA_DIR_ENV}: {_missing_files_message(directory)}.\n{HOW_TO_GET_DATA}")
        return directory
    if locate_files(SYSTEM_DATA_DIR) is not None:
        return SYSTEM_DATA_DIR
    cache = CACHE_DATA_DIR.expanduser()
    if locate_files(cache) is not None:
        return cache
    if download and _download_fashion_mnist(cache) and locate_files(cache) is not None:
        return cache
    tried = [f"${DATA_DIR_ENV} (unset)", str(SYSTEM_DATA_DIR), str(cache)]
    download_note = "download failed or no network" if download else "download disabled"
    raise DataNotFoundError(
        f"Fashion-MNIST not found (looked in: {', '.join(tried)}; {download_note}).\n{HOW_TO_GET_DATA}"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Normalised images (N, 1, 28, 28) float32 and int64 labels, train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: float
    std: float
    directory: Path
    num_classes: int = 10


def _load_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dim() != 3:
        raise IdxFormatError(f"{images_path}: expected 3 dims (N, H, W), got {tuple(images.shape)}")
    if labels.dim() != 1:
        raise IdxFormatError(f"{labels_path}: expected 1 dim (N,), got {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    return images, labels.to(torch.int64)


def _take(x: torch.Tensor, limit: int | None) -> torch.Tensor:
    if limit is None:
        return x
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return x[:limit]


def load_dataset(
    data_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    download: bool = True,
) -> Dataset:
    """Find (see :func:`find_data_dir`) and load the dataset, normalised by the training set.

    The mean and standard deviation are those of the full training set, so a subset chosen by
    ``limit_train``/``limit_test`` (the first examples) is scaled exactly like the full data.
    """
    directory = find_data_dir(data_dir, download=download)
    files = locate_files(directory)
    assert files is not None  # find_data_dir guarantees it
    train_images, train_y = _load_split(files.train_images, files.train_labels)
    test_images, test_y = _load_split(files.test_images, files.test_labels)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise IdxFormatError(
            f"{directory}: train images are {tuple(train_images.shape[1:])} but test images are "
            f"{tuple(test_images.shape[1:])}"
        )
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if int(min(train_y.min(), test_y.min())) < 0:
        raise IdxFormatError(f"{directory}: negative labels")

    train_float = train_images.to(torch.float32).div_(255.0)
    mean = float(train_float.mean())
    std = float(train_float.std())
    if not std > 0:
        raise IdxFormatError(f"{files.train_images}: all pixels are equal; cannot normalise")

    def normalise(images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).div_(255.0).sub_(mean).div_(std)
        return x.unsqueeze(1).contiguous()  # (N, 1, H, W)

    return Dataset(
        train_x=normalise(_take(train_images, limit_train)),
        train_y=_take(train_y, limit_train).clone(),
        test_x=normalise(_take(test_images, limit_test)),
        test_y=_take(test_y, limit_test).clone(),
        mean=mean,
        std=std,
        directory=directory,
        num_classes=max(num_classes, 10),
    )
