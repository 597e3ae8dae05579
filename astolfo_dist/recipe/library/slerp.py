"""slerp: spherical interpolation of two models, per tensor (mergekit's `t`; alias `alpha`).

One statistic pass sums |a|^2, |b|^2 and a.b over the whole tensor, exactly (_exact.py: each
product rounded once in float64, then an exact, order-free sum; with float32 or narrower
sources the products are exact too, so the statistics are correctly rounded). Then once,
on the driver:

    cos = a.b / (|a| |b|), clamped to [-1, 1]
    if |a| == 0 or |b| == 0 or |cos| > dot_threshold (default 0.9995, mergekit's value):
        s0, s1 = 1 - t, t                       (linear interpolation: nearly (anti)parallel)
    else:
        theta = acos(cos)
        s0 = sin((1 - t) * theta) / sin(theta),  s1 = sin(t * theta) / sin(theta)

and every element is a * s0 + b * s1 (mul, mul, add). t = 0 or 1 needs no pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._exact import ExactSum, exact_dot
from .base import Method, Params, Read, State


@dataclass(frozen=True)
class SlerpParams(Params):
    t: float = 0.5
    dot_threshold: float = 0.9995

    method: ClassVar[str] = "slerp"
    aliases: ClassVar[dict[str, str]] = {"alpha": "t"}

    def __post_init__(self) -> None:
        self._real("t", lo=0.0, hi=1.0)
        self._real("dot_threshold", lo=0.0, hi=1.0)


@dataclass
class SlerpState(State):
    aa: ExactSum = field(default_factory=ExactSum)
    bb: ExactSum = field(default_factory=ExactSum)
    ab: ExactSum = field(default_factory=ExactSum)
    s0: float = 0.0
    s1: float = 0.0
    linear: bool = False  # the fallback was taken


class Slerp(Method[SlerpParams, SlerpState]):
    name = "slerp"
    params_type = SlerpParams
    scratch_chunks = 12
    min_inputs = 2
    max_inputs = 2

    @property
    def tensor_passes(self) -> int:
        return 0 if self.params.t in (0.0, 1.0) else 1

    def _begin(self, key: str, numel: int, n_inputs: int) -> SlerpState:
        t = self.params.t
        state = SlerpState(key, numel, n_inputs, done=self.tensor_passes == 0)
        if state.done:
            state.s0, state.s1, state.linear = 1.0 - t, t, True
        return state

    def _observe(self, state: SlerpState, start: int, read: Read) -> int:
        ws = self.workspace
        x = read(0)
        a = ws.like("slerp.a", x, torch.float64).copy_(x)  # kept past the next read
        exact_dot(a, a, state.aa, ws)
        x = read(1)
        b = x if x.dtype == torch.float64 else ws.like("slerp.b", x, torch.float64).copy_(x)
        exact_dot(b, b, state.bb, ws)
        exact_dot(a, b, state.ab, ws)
        return a.numel()

    def _merge(self, a: SlerpState, b: SlerpState) -> None:
        a.aa.merge(b.aa)
        a.bb.merge(b.bb)
        a.ab.merge(b.ab)

    def _end_pass(self, state: SlerpState) -> None:
        t = self.params.t
        state.s0, state.s1, state.linear = slerp_coefficients(
            state.aa.value(), state.bb.value(), state.ab.value(), t, self.params.dot_threshold
        )
        state.aa = state.bb = state.ab = ExactSum()
        state.done = True

    def output(self, state: SlerpState, start: int, read: Read, out: torch.Tensor) -> None:
        torch.mul(read(0), state.s0, out=out)
        out.add_(torch.mul(read(1), state.s1, out=self.workspace.like("slerp.term", out)))


def slerp_coefficients(aa: float, bb: float, ab: float, t: float, dot_threshold: float) -> tuple[float, float, bool]:
    """(s0, s1, linear) from |a|^2, |b|^2, a.b; see the module docstring."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if na == 0.0 or nb == 0.0 or not math.isfinite(na * nb):
        return 1.0 - t, t, True
    cos = min(1.0, max(-1.0, ab / na / nb))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t, True
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta, False
