"""dtype names (numpy-style, as DESIGN.md lists them) and their spellings in each format.

numpy and ml_dtypes are imported only when an array is actually built, so that listing a
checkpoint stays cheap.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from paramctl.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

ITEMSIZE: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}

FLOATING = {name for name in ITEMSIZE if name.startswith(("float", "bfloat", "complex"))}

# safetensors header codes
SAFETENSORS: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
TO_SAFETENSORS = {name: code for code, name in SAFETENSORS.items()}

# legacy typed storages in a torch pickle (torch.FloatStorage, ...)
TORCH_STORAGES: dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


def itemsize(dtype: str) -> int:
    return ITEMSIZE[dtype]


def check_name(dtype: str) -> str:
    """Return DTYPE if paramctl knows it, else raise a usage error listing the known names."""
    if dtype not in ITEMSIZE:
        raise UsageError(f"unknown dtype {dtype!r}; known: {' '.join(ITEMSIZE)}")
    return dtype


@cache
def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a paramctl dtype name (bf16 and float8 come from ml_dtypes)."""
    import numpy as np

    if dtype in ("bfloat16",) or dtype.startswith("float8"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype).newbyteorder("<")


def from_numpy(dt: np.dtype) -> str:
    """The paramctl dtype name of a numpy dtype, or raise UsageError."""
    name = dt.name
    if name not in ITEMSIZE or dt.byteorder == ">":
        raise UsageError(f"unsupported dtype {dt}")
    return name


def torch_dtype(dtype: str):  # -> torch.dtype; torch is imported by the caller already
    import torch

    return getattr(torch, dtype)


def from_torch(dt) -> str:
    name = str(dt).removeprefix("torch.")
    if name not in ITEMSIZE:
        raise UsageError(f"unsupported torch dtype {dt}")
    return name
