"""Build and install spngd_ext.

The CUDA extension ``spngd_ext._C`` (sources listed in csrc/sources.txt) is built when PyTorch has
CUDA support and nvcc is found (CUDA_HOME); otherwise, or with ``SPNGD_NO_CUDA=1``, only the
pure-Python package is installed and every op runs its PyTorch reference. PyTorch must already be
installed, so build without isolation:

    pip install --no-build-isolation -e .            # or: python setup.py build_ext --inplace

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default: the visible GPUs, else 9.0);
``MAX_JOBS`` bounds ninja's parallel compile jobs; ``SPNGD_REQUIRE_CUDA_BUILD=1`` makes a missing
CUDA toolchain an error instead of a pure-Python install.
"""

import os
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent
NAME = "spngd_ext"


def _sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _extension():
    """([CUDAExtension], cmdclass) when the extension can be built, else ([], {}) with a message."""
    if os.environ.get("SPNGD_NO_CUDA", "") not in ("", "0"):
        print(f"{NAME}: SPNGD_NO_CUDA is set: installing the pure-Python package (no spngd_ext._C)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        print(f"{NAME}: PyTorch is not importable: installing the pure-Python package (no spngd_ext._C)")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        why = "PyTorch has no CUDA support" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        print(f"{NAME}: {why}: installing the pure-Python package (no spngd_ext._C)")
        return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Without a GPU, torch would compile for every architecture nvcc knows: far slower.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        print(f"{NAME}: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for sm_90")

    include_dirs = [str(ROOT / "csrc")]
    # Torch's CUDA headers include cusparse.h/cublas_v2.h; pip-installed CUDA keeps those in the
    # nvidia wheels rather than in CUDA_HOME. Add them only when CUDA_HOME lacks them.
    if not (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        try:
            import nvidia

            for base in nvidia.__path__:
                for inc in sorted(Path(base).glob("*/include")):
                    if (inc / "cusparse.h").exists():
                        include_dirs.append(str(inc))
        except ImportError:
            pass

    ext = CUDAExtension(
        name=f"{NAME}._C",
        sources=_sources(),
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            # IEEE division and square root everywhere (no --use_fast_math): the Cholesky needs them.
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    print(
        f"{NAME}: building the CUDA extension {NAME}._C for TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}"
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()
if not ext_modules and os.environ.get("SPNGD_REQUIRE_CUDA_BUILD", "") not in ("", "0"):
    raise SystemExit(f"{NAME}: SPNGD_REQUIRE_CUDA_BUILD is set but the CUDA extension cannot be built (see above)")

setup(
    name=NAME,
    version="0.1.0",
    description="SP-NGD: a K-FAC natural-gradient optimizer for PyTorch with fused CUDA curvature kernels",
    python_requires=">=3.9",
    packages=find_namespace_packages(include=[NAME, f"{NAME}.*"]),
    # The optimizer needs torch (and numpy through it) alone; the training application's progress
    # bars and plots come with the "train" extra.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "train": ["tqdm", "matplotlib"],
        "test": [
            "tqdm",
            "matplotlib",
            "pytest",
            "hypothesis",
            "torchvision",
            "asdfghjkl==0.1a5",
            "pytorch-optimizer==3.10.0",
            "ruff",
            "mypy",
        ],
        "peers": ["asdfghjkl==0.1a5", "pytorch-optimizer==3.10.0"],
        "bench": ["cupy-cuda13x"],
    },
    entry_points={"console_scripts": ["spngd-train = spngd_ext.train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
