"""della: DELLA-merging (Deep et al. 2024): magnitude-ranked drop probabilities (MAGPRUNE).

Each element of each task vector d = x_i - base is kept with a probability that grows with
the rank of |d| within the tensor, linearly from density - epsilon/2 (smallest) to
density + epsilon/2 (largest), and kept deltas are divided by their keep probability
(`rescale`, default). Then they are combined TIES-style (sign_election=True, default:
mergekit's `della`) or as in task_arithmetic (sign_election=False: `della_linear`).

What is approximate, and how. The exact rank of every element cannot be had in memory
independent of the tensor size, so the rank is the mid-rank of the element's magnitude
bin: one statistic pass counts |d| per bin exactly, bins being the top 12 bits of |d|
rounded to float32 (8 exponent bits + 4 mantissa bits: 16 bins per octave, 4096 bins).
For an element in a bin with `below` elements in lower bins and `count` in its own,

    r = (2 * below + count - 1) / (2 * (numel - 1))      (r = 1/2 when numel == 1)
    p = (density - epsilon / 2) + epsilon * r            (float64: the multiply, then the add,
                                                          then at most 1: rounding may overshoot)

so every element of a bin gets the probability of the bin's middle rank. The error in p is
at most epsilon * (bin share of the tensor) / 2: for real weights a bin holds a few percent
of a tensor at most, so |p - p_exact| stays well below 1e-2 * epsilon. The bins are exact
counts, so p (and the mask, drawn as u < p with recipe/rng.py keyed by seed, input index,
key and element index) is the same for every chunking. Ranks are per tensor (mergekit ranks
per row). epsilon = 0 needs no pass (p = density everywhere, as DARE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..rng import bernoulli_mask, stream
from ..workspace import Workspace
from ._taskvec import TaskVectorMethod, TaskVectorParams, keep_only
from .base import Read, State, cpu_kernels

BIN_BITS = 12
_SHIFT = 31 - BIN_BITS


def magnitude_bins(delta: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """The rank bin of every element: the top 12 bits of |delta| as float32 (int64, 0..4095).

    With `workspace`, the result and its temporaries are its buffers (tags "della.*")."""
    if workspace is None:
        bits = delta.abs().to(torch.float32).view(torch.int32)
        return (bits & 0x7FFFFFFF).bitwise_right_shift_(_SHIFT).to(torch.int64)
    # Rounding to float32 is symmetric, so |round(d)| == round(|d|); the sign bit is cleared below anyway.
    narrow = workspace.like("della.narrow", delta, torch.float32).copy_(delta)
    bins = workspace.like("della.bins", delta, torch.int64).copy_(narrow.view(torch.int32))  # sign-extended,
    return bins.bitwise_and_(0x7FFFFFFF).bitwise_right_shift_(_SHIFT)  # cleared by the mask


@dataclass(frozen=True)
class DellaParams(TaskVectorParams):
    sign_election: bool = True
    density: float = 0.5  # mean keep probability
    epsilon: float = 0.15  # spread of the keep probabilities around density
    rescale: bool = True
    seed: int = 0

    method: ClassVar[str] = "della"

    def __post_init__(self) -> None:
        super().__post_init__()
        density = self._real("density", lo=0.0, hi=1.0, lo_open=True)
        eps = self._real("epsilon", lo=0.0)
        if density - eps / 2 <= 0.0 or density + eps / 2 > 1.0:
            self._fail("epsilon", f"must keep density -/+ epsilon/2 in (0, 1], got density={density}, epsilon={eps}")
        self._bool("rescale")
        self._int("seed", lo=0)


@dataclass
class DellaState(State):
    hist: list[torch.Tensor | None] = field(default_factory=list)  # per non-base input, 4096 counts
    probs: list[torch.Tensor] = field(default_factory=list)  # per non-base input, p per bin (float64)


class Della(TaskVectorMethod):
    name = "della"
    params_type = DellaParams

    @property
    def tensor_passes(self) -> int:
        return 1 if self.params.epsilon > 0 else 0

    def _begin(self, key: str, numel: int, n_inputs: int) -> DellaState:
        n = len(self.others(n_inputs))
        return DellaState(key, numel, n_inputs, done=self.tensor_passes == 0, hist=[None] * n)

    def _observe(self, state: DellaState, start: int, read: Read) -> int:
        ws = self.workspace
        x = read(self.base)
        base = ws.like("taskvec.base", x).copy_(x)
        delta = ws.like("taskvec.delta", base)
        fused = cpu_kernels(delta) if delta.dtype == torch.float32 else None  # bins are float32 patterns
        for j, i in enumerate(self.others(state.n_inputs)):
            torch.sub(read(i), base, out=delta)
            if state.hist[j] is None:  # on the chunks' device until end_pass: no host wait per chunk
                state.hist[j] = torch.zeros(1 << BIN_BITS, dtype=torch.int64, device=delta.device)
            if fused is not None:  # magnitude_bins and the count in one pass
                fused.digit_histogram(delta, 0, 0, 31, BIN_BITS, state.hist[j], None, clamp_nan=False)
                continue
            bins = magnitude_bins(delta, ws)
            state.hist[j].index_add_(0, bins, torch.ones(1, dtype=torch.int64, device=bins.device).expand(bins.numel()))
        return base.numel()

    def _merge(self, a: DellaState, b: DellaState) -> None:
        for j, h in enumerate(b.hist):
            if h is not None:
                a.hist[j] = h.clone() if a.hist[j] is None else a.hist[j].add_(h.to(a.hist[j].device))

    def _end_pass(self, state: DellaState) -> None:
        p: DellaParams = self.params
        lower = p.density - p.epsilon / 2
        probs = []
        for h in state.hist:
            counts = h.to("cpu") if h is not None else torch.zeros(1 << BIN_BITS, dtype=torch.int64)
            below = torch.cumsum(counts, 0) - counts
            if state.numel > 1:
                r = (2 * below + counts - 1).to(torch.float64) / float(2 * (state.numel - 1))
            else:
                r = torch.full((1 << BIN_BITS,), 0.5, dtype=torch.float64)
            probs.append(r.mul_(p.epsilon).add_(lower).clamp_(max=1.0))
        state.probs = probs
        state.hist = []
        state.done = True

    def takes_source(self, state: DellaState, j: int, base: torch.Tensor) -> bool:
        """On the CPU the fused pass reads float16 and bfloat16 inputs as stored."""
        return cpu_kernels(base) is not None

    def fused_delta(self, state: DellaState, j: int, i: int, start: int, x: torch.Tensor, base: torch.Tensor,
                    out: torch.Tensor, accumulate: bool) -> bool:
        """On the CPU: subtract, bin, draw, drop and rescale (and add) in one pass (_fused.della_delta),
        x as read."""
        kernels = cpu_kernels(out, base, source=x)
        if kernels is None:
            return False
        p: DellaParams = self.params
        probs = state.probs[j].numpy() if state.probs else np.full(1 << BIN_BITS, p.density)
        kernels.della_delta(out, x, base, stream(p.seed, i, state.key), start, probs, rescale=p.rescale,
                           accumulate=accumulate)
        return True

    def sparsify(self, state: DellaState, j: int, i: int, start: int, delta: torch.Tensor) -> None:
        p: DellaParams = self.params
        if state.probs:
            prob = state.probs[j].to(delta.device)[magnitude_bins(delta)]
        else:  # epsilon == 0: one probability
            prob = torch.full(delta.shape, p.density, dtype=torch.float64, device=delta.device)
        keep = bernoulli_mask(p.seed, i, state.key, start, delta.numel(), prob, device=delta.device)
        keep_only(delta, keep, self.workspace)
        if p.rescale:
            delta.div_(prob.to(delta.dtype))
