"""spngd_ext: SP-NGD (Scalable and Practical Natural Gradient, Osawa et al., TPAMI 2020) for PyTorch."""

from . import ops
from .compiled_model import compile_model
from .ops.extension import cuda_ops_available, extension_loaded
from .optimizer import SPNGD
from .options import SPNGDOptions
from .refresh import StalePolicy

__version__ = "0.1.0"
__all__ = [
    "SPNGD",
    "SPNGDOptions",
    "StalePolicy",
    "compile_model",
    "ops",
    "cuda_ops_available",
    "extension_loaded",
    "__version__",
]
