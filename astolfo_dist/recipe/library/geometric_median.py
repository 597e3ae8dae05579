"""geometric_median: the point minimising the sum of Euclidean distances to the inputs, per tensor.

Weiszfeld's iteration, streamed. The estimate is never stored: it is the weighted average
z = (sum_i b_i x_i) / (sum_i b_i) of the inputs with the current weights b (N numbers in the
state), recomputed per chunk (elementwise: x_0*b_0 + x_1*b_1 + ... in input order, then one
division by the left-to-right float64 sum of the b_i). Each statistic pass is one iteration:
it sums, exactly (_exact.py), |x_i - z|^2 over the whole tensor for every input; then, once,
on the driver:

    b_i' = 1 / max(eps, |x_i - z|),  normalised to sum to 1 (math.fsum)
    stop when max_i |b_i' - b_i| < tol (weights normalised the same way), or after maxiter

The first estimate uses b_i = 1/N (the mean). Exact: every iteration's statistics and hence
the output bits are independent of chunking. Approximate: the result is the Weiszfeld
iterate at which it stopped, not the true median; the distance from the true median depends
on the data (the iteration converges linearly). Each iteration reads every input twice per
chunk (2N reads; memory: the estimate and one scratch chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._exact import ExactSum, exact_dot
from .base import Method, Params, Read, State, divide_


@dataclass(frozen=True)
class GeometricMedianParams(Params):
    eps: float = 1e-6  # distances below eps count as eps (keeps 1/distance finite)
    maxiter: int = 100
    tol: float = 1e-6  # on the change of the normalised weights

    method: ClassVar[str] = "geometric_median"

    def __post_init__(self) -> None:
        self._real("eps", lo=0.0, lo_open=True)
        self._int("maxiter", lo=0)
        self._real("tol", lo=0.0)


@dataclass
class GeometricMedianState(State):
    weights: tuple[float, ...] = ()
    dist2: list[ExactSum] = field(default_factory=list)
    iterations: int = 0
    change: float = math.inf


class GeometricMedian(Method[GeometricMedianParams, GeometricMedianState]):
    name = "geometric_median"
    params_type = GeometricMedianParams
    scratch_chunks = 12

    @property
    def tensor_passes(self) -> int:
        return self.params.maxiter

    def _begin(self, key: str, numel: int, n_inputs: int) -> GeometricMedianState:
        return GeometricMedianState(
            key,
            numel,
            n_inputs,
            done=self.params.maxiter == 0 or n_inputs == 1,
            weights=(1.0 / n_inputs,) * n_inputs,
            dist2=[ExactSum() for _ in range(n_inputs)],
        )

    def _estimate(self, weights: tuple[float, ...], read: Read, out: torch.Tensor | None) -> torch.Tensor:
        """The current estimate z, into `out` (None: a workspace buffer)."""
        x = read(0)
        if out is None:
            out = self.workspace.like("geometric_median.z", x)
        torch.mul(x, weights[0], out=out)
        if len(weights) > 1:
            tmp = self.workspace.like("geometric_median.term", out)
            for i in range(1, len(weights)):
                out.add_(torch.mul(read(i), weights[i], out=tmp))
        total = 0.0
        for w in weights:
            total += w
        return divide_(out, total)

    def _observe(self, state: GeometricMedianState, start: int, read: Read) -> int:
        z = self._estimate(state.weights, read, None)
        diff = self.workspace.like("geometric_median.diff", z)
        for i in range(state.n_inputs):
            torch.sub(read(i), z, out=diff)
            exact_dot(diff, diff, state.dist2[i], self.workspace)
        return z.numel()

    def _merge(self, a: GeometricMedianState, b: GeometricMedianState) -> None:
        for x, y in zip(a.dist2, b.dist2, strict=True):
            x.merge(y)

    def _end_pass(self, state: GeometricMedianState) -> None:
        p = self.params
        inv = [1.0 / max(p.eps, math.sqrt(s.value())) for s in state.dist2]
        total = math.fsum(inv)
        new = tuple(w / total for w in inv)
        old_total = math.fsum(state.weights)
        state.change = max(abs(a - b / old_total) for a, b in zip(new, state.weights, strict=True))
        state.weights = new
        state.iterations += 1
        state.dist2 = [ExactSum() for _ in range(state.n_inputs)]
        state.done = state.change < p.tol or state.iterations >= p.maxiter

    def output(self, state: GeometricMedianState, start: int, read: Read, out: torch.Tensor) -> None:
        self._estimate(state.weights, read, out)
