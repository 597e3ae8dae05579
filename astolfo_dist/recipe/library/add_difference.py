"""add_difference: A + alpha * (B - C), inputs in the order (A, B, C) (sd-mecha's `alpha`).

Element by element: (B - C), times alpha, plus A; no statistic pass; memory: `out` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Params, Read, State


@dataclass(frozen=True)
class AddDifferenceParams(Params):
    alpha: float = 1.0

    method: ClassVar[str] = "add_difference"

    def __post_init__(self) -> None:
        self._real("alpha")


class AddDifference(Method[AddDifferenceParams, State]):
    name = "add_difference"
    params_type = AddDifferenceParams
    min_inputs = 3
    max_inputs = 3

    def output(self, state: State, start: int, read: Read, out: torch.Tensor) -> None:
        out.copy_(read(1))
        out.sub_(read(2))
        out.mul_(self.params.alpha)
        out.add_(read(0))
