"""weighted_sum: out = sum_i w_i * x_i (mergekit's `linear`), optionally divided by sum_i w_i.

Exact in the sense of the engine: each element is x_0*w_0 + x_1*w_1 + ... rounded op by op
in input order in the accumulator dtype (no statistic pass). Memory: `out` + one scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import UsageError
from .base import Method, Params, Read, State, divide_, input_weights


@dataclass(frozen=True)
class WeightedSumParams(Params):
    weights: tuple[float, ...] | None = None  # one per input; None: all 1/n
    normalize: bool = False  # divide by the sum of the weights (left to right, float64)

    method: ClassVar[str] = "weighted_sum"
    aliases: ClassVar[dict[str, str]] = {"weight": "weights"}

    def __post_init__(self) -> None:
        self._weights("weights")
        self._bool("normalize")


class WeightedSum(Method[WeightedSumParams, State]):
    name = "weighted_sum"
    params_type = WeightedSumParams
    scratch_chunks = 1

    def check_inputs(self, n_inputs: int) -> None:
        super().check_inputs(n_inputs)
        if self.params.normalize and _ordered_sum(self.weights_for(n_inputs)) == 0.0:
            raise UsageError(f"{self.name}: the weights sum to zero; cannot normalize")

    def weights_for(self, n: int) -> tuple[float, ...]:
        if self.params.weights is None:
            return (1.0 / n,) * n
        return input_weights(self.name, self.params.weights, n)

    def output(self, state: State, start: int, read: Read, out: torch.Tensor) -> None:
        weights = self.weights_for(state.n_inputs)
        torch.mul(read(0), weights[0], out=out)
        if state.n_inputs > 1:
            tmp = self.workspace.like("weighted_sum.term", out)
            for i in range(1, state.n_inputs):
                out.add_(torch.mul(read(i), weights[i], out=tmp))
        if self.params.normalize:
            divide_(out, _ordered_sum(weights))


def _ordered_sum(values: tuple[float, ...]) -> float:
    total = 0.0
    for v in values:
        total += v
    return total
