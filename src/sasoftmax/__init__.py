"""sasoftmax: Self-Adjust Softmax and Scalable-Softmax attention for PyTorch."""

from .attention import attention
from .backends import BACKENDS
from .backends.relative_bias import RelativeBias
from .normalizers import NORMALIZERS, normalize

__version__ = "0.1.0"

__all__ = ["BACKENDS", "NORMALIZERS", "RelativeBias", "attention", "normalize", "__version__"]
