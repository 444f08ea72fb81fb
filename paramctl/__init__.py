"""paramctl: inspect and edit saved model checkpoints (PyTorch, safetensors, Keras HDF5)."""

from paramctl.errors import FormatError, ParamctlError, UnsafeContentError, UsageError
from paramctl.formats import load, save
from paramctl.table import Checkpoint, Storage, Tensor

__all__ = [
    "load",
    "save",
    "Checkpoint",
    "Tensor",
    "Storage",
    "ParamctlError",
    "FormatError",
    "UnsafeContentError",
    "UsageError",
]
__version__ = "0.1.0"
