"""uniform: the plain average, (x_0 + x_1 + ... + x_{n-1}) / n.

Adds in input order and divides once (one rounding fewer per input than weights of 1/n).
No statistic pass; memory: `out` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Method, Params, Read, State, divide_


@dataclass(frozen=True)
class UniformParams(Params):
    method: ClassVar[str] = "uniform"


class Uniform(Method[UniformParams, State]):
    name = "uniform"
    params_type = UniformParams

    def output(self, state: State, start: int, read: Read, out: torch.Tensor) -> None:
        out.copy_(read(0))
        for i in range(1, state.n_inputs):
            out.add_(read(i))
        if state.n_inputs > 1:
            divide_(out, state.n_inputs)
