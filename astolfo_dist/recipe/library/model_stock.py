"""model_stock: Model Stock (Jang et al. 2024): how far to move from the base toward the mean.

Inputs: the base and N >= 2 fine-tuned models. One statistic pass sums, exactly (_exact.py),
|d_j|^2 and d_j.d_k for the task vectors d_j = x_j - base (all N(N+1)/2 of them: O(N^2)
numbers; the pass reads each chunk 1 + N + (N-1)(N-2)/2 times with two chunk buffers).
Then, once:

    cos = mean over pairs j < k of d_j.d_k / (|d_j| |d_k|)   (a pair with a zero vector: 0)
    t   = N cos / (1 + (N - 1) cos)                          (t = 0 if the denominator <= 0,
                                                              possible only through rounding)
    out = t * mean_j(x_j) + (1 - t) * base

The cosine is per tensor (mergekit's filter_wise=False). Elementwise: the x_j summed in input
order, divided by N, times t, plus base * (1 - t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._exact import ExactSum, exact_dot
from .base import Method, Params, Read, State, divide_


@dataclass(frozen=True)
class ModelStockParams(Params):
    method: ClassVar[str] = "model_stock"


@dataclass
class ModelStockState(State):
    gram: list[ExactSum] = field(default_factory=list)  # upper triangle of d_j.d_k, row by row
    t: float = 0.0
    cos: float = 0.0


def _pair(j: int, k: int, n: int) -> int:
    """Index of (j, k), j <= k, in the row-major upper triangle of an n x n matrix."""
    return j * n - j * (j - 1) // 2 + (k - j)


class ModelStock(Method[ModelStockParams, ModelStockState]):
    name = "model_stock"
    params_type = ModelStockParams
    scratch_chunks = 15
    uses_base = True
    min_inputs = 3

    @property
    def tensor_passes(self) -> int:
        return 1

    def _begin(self, key: str, numel: int, n_inputs: int) -> ModelStockState:
        n = n_inputs - 1
        return ModelStockState(key, numel, n_inputs, done=False, gram=[ExactSum() for _ in range(n * (n + 1) // 2)])

    def _observe(self, state: ModelStockState, start: int, read: Read) -> int:
        others = self.others(state.n_inputs)
        n = len(others)
        ws = self.workspace
        x = read(self.base)
        base = ws.like("model_stock.base", x).copy_(x)
        d = ws.like("model_stock.d", base)
        e = ws.like("model_stock.e", base)
        for j in range(n - 1):
            torch.sub(read(others[j]), base, out=d)
            if j == 0:
                exact_dot(d, d, state.gram[_pair(0, 0, n)], ws)
            for k in range(j + 1, n):
                torch.sub(read(others[k]), base, out=e)
                exact_dot(d, e, state.gram[_pair(j, k, n)], ws)
                if j == 0:  # the first row's sweep reads every other input: take its norm too
                    exact_dot(e, e, state.gram[_pair(k, k, n)], ws)
        return base.numel()

    def _merge(self, a: ModelStockState, b: ModelStockState) -> None:
        for x, y in zip(a.gram, b.gram, strict=True):
            x.merge(y)

    def _end_pass(self, state: ModelStockState) -> None:
        n = state.n_inputs - 1
        g = [s.value() for s in state.gram]
        norms = [math.sqrt(g[_pair(j, j, n)]) for j in range(n)]
        cosines = []
        for j in range(n):
            for k in range(j + 1, n):
                if norms[j] == 0.0 or norms[k] == 0.0:
                    cosines.append(0.0)
                else:
                    cosines.append(g[_pair(j, k, n)] / norms[j] / norms[k])
        cos = min(1.0, max(-1.0, math.fsum(cosines) / len(cosines)))
        denom = 1.0 + (n - 1) * cos
        state.cos = cos
        state.t = n * cos / denom if denom > 0.0 else 0.0
        state.gram = []
        state.done = True

    def output(self, state: ModelStockState, start: int, read: Read, out: torch.Tensor) -> None:
        others = self.others(state.n_inputs)
        out.copy_(read(others[0]))
        for i in others[1:]:
            out.add_(read(i))
        divide_(out, len(others))
        out.mul_(state.t)
        out.add_(torch.mul(read(self.base), 1.0 - state.t, out=self.workspace.like("model_stock.term", out)))
