"""Float dtype names: ``"bf16"``/``"bfloat16"``/``torch.bfloat16`` → ``torch.bfloat16`` and back.

The bottom of the house: :mod:`qtune.hardware` and every format use it, and it imports nothing of qtune.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(value: str | torch.dtype | None, *, what: str = "dtype") -> torch.dtype | None:
    """Turn ``"bf16"``/``"bfloat16"``/``torch.bfloat16`` into a float ``torch.dtype`` (``None`` passes)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in FLOAT_DTYPES:
            raise TypeError(f"{what} must be a floating dtype, got {value}")
        return value
    key = str(value).removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"{what}={value!r} is not one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
