"""The safetensors dtype table.

`rank` is the position of the dtype in the safetensors library's own `Dtype` enum; its
serializer orders tensors by rank, descending, then by name, and the output layout copies
that so our files are the ones `safetensors.torch.save_file` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["float", "int", "bool", "complex", "scale"]


@dataclass(frozen=True)
class DType:
    name: str
    bits: int
    kind: Kind
    rank: int
    torch_dtype: torch.dtype | None

    @property
    def reducible(self) -> bool:
        """Floats the engine averages; everything else is copied from one input, never mixed."""
        return self.name in REDUCIBLE

    def nbytes(self, numel: int) -> int | None:
        """Bytes for `numel` elements, or None when they do not end on a byte boundary."""
        bits = numel * self.bits
        return bits // 8 if bits % 8 == 0 else None

    @property
    def itemsize(self) -> int:
        if self.bits % 8:
            raise ValueError(f"{self.name} has no whole-byte item size")
        return self.bits // 8


def _t(name: str) -> torch.dtype | None:
    return getattr(torch, name, None)


_TABLE: tuple[tuple[str, int, Kind, torch.dtype | None], ...] = (
    ("BOOL", 8, "bool", torch.bool),
    ("F4", 4, "float", None),
    ("F6_E2M3", 6, "float", None),
    ("F6_E3M2", 6, "float", None),
    ("U8", 8, "int", torch.uint8),
    ("I8", 8, "int", torch.int8),
    ("F8_E5M2", 8, "float", _t("float8_e5m2")),
    ("F8_E4M3", 8, "float", _t("float8_e4m3fn")),
    ("F8_E8M0", 8, "scale", _t("float8_e8m0fnu")),
    ("F8_E4M3FNUZ", 8, "float", _t("float8_e4m3fnuz")),
    ("F8_E5M2FNUZ", 8, "float", _t("float8_e5m2fnuz")),
    ("I16", 16, "int", torch.int16),
    ("U16", 16, "int", _t("uint16")),
    ("F16", 16, "float", torch.float16),
    ("BF16", 16, "float", torch.bfloat16),
    ("I32", 32, "int", torch.int32),
    ("U32", 32, "int", _t("uint32")),
    ("F32", 32, "float", torch.float32),
    ("C64", 64, "complex", torch.complex64),
    ("F64", 64, "float", torch.float64),
    ("I64", 64, "int", torch.int64),
    ("U64", 64, "int", _t("uint64")),
)

DTYPES: dict[str, DType] = {
    name: DType(name, bits, kind, rank, tdt) for rank, (name, bits, kind, tdt) in enumerate(_TABLE)
}

# Floats the engine reduces. Sub-byte floats, FNUZ variants and the E8M0 scale format are
# storage formats of quantised models: averaging them elementwise is meaningless, so they
# are copied like integers.
REDUCIBLE = frozenset({"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"})

# --dtype choices for reduced tensors.
OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp64": "F64"}

# Outputs that a float32 accumulator cannot serve within one unit in the last place:
# float32/float64 (no spare precision) and bfloat16 (float32's exponent range, so where
# inputs cancel, a result near zero has a far finer ulp than float32's absolute error).
# float16 and the 8-bit floats have a subnormal floor at or above float32's error and
# take the faster float32 accumulator.
NEEDS_FP64_ACCUMULATOR = frozenset({"BF16", "F32", "F64"})


def dtype(name: str) -> DType:
    return DTYPES[name]
