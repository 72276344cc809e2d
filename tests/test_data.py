"""IDX reading/validation, the data-directory search order, and the real Fashion-MNIST files."""

from __future__ import annotations

import gzip
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from spngd_ext.train import data
from spngd_ext.train.data import (
    DataNotFoundError,
    IdxFormatError,
    find_data_dir,
    load_dataset,
    locate_files,
    read_idx,
    write_idx,
)


def make_dataset_dir(directory: Path, n_train: int = 12, n_test: int = 6, gz: bool = True, seed: int = 0) -> Path:
    """A tiny MNIST-format dataset (random 28x28 images, labels 0..9) in ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            directory / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        )
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return directory


# ------------------------------------------------------------------------------ IDX format


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, name: str, dtype) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5)
    array = (array % 200).astype(dtype) if dtype == np.uint8 else array.astype(dtype)
    path = write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    tensor = read_idx(path)
    assert tuple(tensor.shape) == (2, 3, 5)
    np.testing.assert_array_equal(tensor.numpy(), array)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    raw = write_idx(tmp_path / "raw", array, compress=False)
    compressed = tmp_path / "compressed-without-suffix"
    compressed.write_bytes(gzip.compress(raw.read_bytes()))
    np.testing.assert_array_equal(read_idx(compressed).numpy(), array)


def test_corrupt_magic_number_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x00\x01\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(IdxFormatError, match="magic number") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_unknown_type_code(tmp_path: Path) -> None:
    path = tmp_path / "bad-type"
    path.write_bytes(b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(IdxFormatError, match="magic number"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path: Path, gz: bool) -> None:
    full = write_idx(tmp_path / "full", np.zeros((4, 28, 28), dtype=np.uint8), compress=False)
    cut = full.read_bytes()[:-100]
    path = tmp_path / ("cut.gz" if gz else "cut")
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(IdxFormatError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert "3136" in str(info.value)  # the expected payload size is reported


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    full = write_idx(tmp_path / "full.gz", np.arange(5000, dtype=np.int32))
    path = tmp_path / "cut.gz"
    path.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(IdxFormatError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_trailing_bytes_and_short_header(tmp_path: Path) -> None:
    full = write_idx(tmp_path / "full", np.arange(6, dtype=np.uint8), compress=False)
    extra = tmp_path / "extra"
    extra.write_bytes(full.read_bytes() + b"\x00\x00")
    with pytest.raises(IdxFormatError, match="trailing"):
        read_idx(extra)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(IdxFormatError, match="3 dimensions"):
        read_idx(short)


def test_mismatched_image_and_label_counts(tmp_path: Path) -> None:
    directory = make_dataset_dir(tmp_path / "ds")
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="12 images but .* 5 labels"):
        load_dataset(directory)


# ------------------------------------------------------------------------------ search order


@pytest.fixture
def isolated_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Point the system and cache locations into tmp_path, unset the env var, forbid the network."""
    paths = {
        "system": tmp_path / "system",
        "cache": tmp_path / "cache",
        "env": tmp_path / "env",
        "explicit": tmp_path / "explicit",
    }
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", paths["system"])
    monkeypatch.setattr(data, "CACHE_DATA_DIR", paths["cache"])
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    return paths


def test_search_order(isolated_search: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    p = isolated_search
    for name in ("system", "cache", "env", "explicit"):
        make_dataset_dir(p[name], gz=name != "cache")  # the cache copy is raw, to cover both
    monkeypatch.setenv(data.DATA_DIR_ENV, str(p["env"]))
    assert find_data_dir(p["explicit"]) == p["explicit"]
    assert find_data_dir() == p["env"]
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert find_data_dir() == p["system"]
    for f in p["system"].iterdir():
        f.unlink()
    assert find_data_dir() == p["cache"]
    assert locate_files(p["cache"]).train_images.name == "train-images-idx3-ubyte"


def test_explicit_dir_without_files_is_an_error(isolated_search: dict[str, Path]) -> None:
    p = isolated_search
    make_dataset_dir(p["system"])  # present, but an explicit request must not fall back to it
    p["explicit"].mkdir()
    (p["explicit"] / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataNotFoundError) as info:
        find_data_dir(p["explicit"])
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("--data-dir") and str(p["explicit"]) in first_line
    # Names exactly what is missing: the three absent files, not the one present.
    assert "train-labels-idx1-ubyte" in first_line and "train-images" not in first_line
    assert "SPNGD_DATA_DIR" in str(info.value)  # and how to get the data


def test_env_dir_without_files_is_an_error(isolated_search: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset_dir(isolated_search["system"])
    monkeypatch.setenv(data.DATA_DIR_ENV, str(isolated_search["env"]))
    with pytest.raises(DataNotFoundError, match=r"\$SPNGD_DATA_DIR: .* is not a directory"):
        find_data_dir()


@pytest.mark.parametrize("download", [True, False])
def test_nothing_found_explains_how_to_get_the_data(isolated_search: dict[str, Path], download: bool) -> None:
    with pytest.raises(DataNotFoundError) as info:
        find_data_dir(download=download)
    message = str(info.value)
    for hint in (
        "apt-get install dataset-fashion-mnist",
        "SPNGD_DATA_DIR",
        "--data-dir",
        str(isolated_search["system"]),
        str(isolated_search["cache"]),
    ):
        assert hint in message
    # A failed download leaves no partial files that could later pass for a dataset.
    cache = isolated_search["cache"]
    assert not cache.exists() or not any(cache.iterdir())


def test_download_into_cache(isolated_search: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    mirror = make_dataset_dir(tmp_path / "mirror")

    def fake_urlopen(url: str, timeout: float):
        assert url.startswith(data.FASHION_MNIST_MIRROR) and timeout <= 30
        return open(mirror / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    assert find_data_dir() == isolated_search["cache"]
    assert find_data_dir(download=False) == isolated_search["cache"]  # now cached
    assert len(load_dataset().train_y) == 12


def test_synthetic_dataset_loads_normalised(tmp_path: Path) -> None:
    ds = load_dataset(make_dataset_dir(tmp_path / "ds", gz=False), limit_train=5)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (6, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    with pytest.raises(ValueError, match="limit"):
        load_dataset(tmp_path / "ds", limit_test=0)


# ------------------------------------------------------------------------------ real data


def test_real_fashion_mnist(fmnist_dir: Path) -> None:
    ds = load_dataset(fmnist_dir)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert int(ds.train_y.min()) == 0 and int(ds.train_y.max()) == 9
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    # Normalised by the training set's statistics.
    assert abs(float(ds.train_x.mean())) < 1e-3 and abs(float(ds.train_x.std()) - 1) < 1e-3
    assert 0.2 < ds.mean < 0.4 and 0.3 < ds.std < 0.4
    subset = load_dataset(fmnist_dir, limit_train=100, limit_test=50)
    assert subset.train_x.shape[0] == 100 and subset.test_y.shape[0] == 50
    assert torch.equal(subset.train_x, ds.train_x[:100])  # same scaling as the full set
