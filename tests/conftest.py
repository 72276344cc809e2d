"""Shared fixtures. The real Fashion-MNIST files are required (never skipped): tests that need
them fail with instructions when the data cannot be found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spngd_ext.train.data import locate_files

# The emulated-kernel fixtures (cholesky_emulator, syrk_emulator, bn_emulator, pack_emulator) live with the
# rest of the emulation support in tests/emulation.py.
pytest_plugins = ("emulation",)

# The workspace keeps a copy next to the repository: <workspace>/shared/data/fashion-mnist.
_SIBLING_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Directory with the four Fashion-MNIST IDX files: $SPNGD_DATA_DIR, else ../shared/data."""
    candidates = []
    if os.environ.get("SPNGD_DATA_DIR"):
        candidates.append(Path(os.environ["SPNGD_DATA_DIR"]).expanduser())
    candidates.append(_SIBLING_DATA_DIR)
    for directory in candidates:
        if locate_files(directory) is not None:
            return directory
    try:  # the library's own search: Debian's dataset-fashion-mnist, then ~/.cache (download)
        from spngd_ext.train.data import find_data_dir

        return Path(find_data_dir())
    except Exception:  # noqa: BLE001 — reported below with every place that was tried
        pass
    pytest.fail(
        "Fashion-MNIST IDX files not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "). Set SPNGD_DATA_DIR to a directory holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
        "(e.g. from Debian's dataset-fashion-mnist package: /usr/share/datasets/fashion-mnist)."
    )


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype (exact comparisons), restoring it after."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """One intra-op thread: fastest for the tiny models, deterministic, robust to a loaded machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
