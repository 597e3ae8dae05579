"""What task_arithmetic, ties, dare, della and breadcrumbs share: combining task vectors.

With base b and the other inputs x_1..x_n (input order, the base skipped), weights w_i and
a per-method sparsification s_i (a keep mask, possibly rescaled; identity for task
arithmetic), each element computes

    d_i = w_i * s_i(x_i - b)                       (rounded in this order: sub, sparsify, mul)
    sign election (optional, TIES-style):
        "sum":   S = d_1 + d_2 + ... + d_n         (in input order)
        "count": S = sign(d_1) + ... + sign(d_n)
        elected sign = +1 where S >= 0, else -1    (a tie elects +)
        agree_i = sign(d_i) == elected             (a zero d_i never agrees)
    without election every input agrees
    m = sum over agreeing i of d_i                 (in input order, from +0)
    normalize: m = m / D with D = the sum of w_i over agreeing i (per element with election,
               one number without), where D == 0 is read as 1
    out = b + lambda * m                            (m * lambda, then + b)

Memory per chunk: the base, one input delta, the mix, the divisor and the elected signs:
five chunk-sized buffers whatever the number of inputs. Inputs are read once per sweep:
1 + n reads per chunk, 1 + 2n with sign election (one sweep elects, one sweep mixes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ._select import MAX_PASSES, Selection
from .base import Method, Params, Read, State, input_weights

CONSENSUS = ("sum", "count")


@dataclass(frozen=True)
class TaskVectorParams(Params):
    """Fields every task-vector method has (mergekit names; `lambda` is spelled lambda_)."""

    weights: tuple[float, ...] | None = None  # one per non-base input; None: all 1.0
    lambda_: float = 1.0
    normalize: bool | None = None  # None: True with sign election, False without (as mergekit)
    sign_election: bool = False
    consensus: str = "sum"  # how signs are elected: "sum" (mass) or "count"

    aliases: ClassVar[dict[str, str]] = {"lambda": "lambda_", "scale": "lambda_", "weight": "weights"}

    def __post_init__(self) -> None:
        self._weights("weights")
        self._real("lambda_")
        self._bool("normalize", optional=True)
        self._bool("sign_election")
        self._choice("consensus", CONSENSUS)

    @property
    def normalized(self) -> bool:
        return self.sign_election if self.normalize is None else self.normalize


class TaskVectorMethod(Method):
    """A method whose output is `combine` over (optionally sparsified) task vectors."""

    uses_base = True
    min_inputs = 2

    def check_inputs(self, n_inputs: int) -> None:
        super().check_inputs(n_inputs)
        input_weights(self.name, self.params.weights, n_inputs - 1)

    def sparsify(self, state: State, j: int, i: int, start: int, delta: torch.Tensor) -> None:
        """In place: keep/rescale the delta of input i (the j-th non-base input). Default: keep all."""

    def output(self, state: State, start: int, read: Read, out: torch.Tensor) -> None:
        p: TaskVectorParams = self.params
        ws = self.workspace
        others = self.others(state.n_inputs)
        weights = input_weights(self.name, p.weights, len(others))
        x = read(self.base)
        base = ws.like("taskvec.base", x).copy_(x)
        delta = ws.like("taskvec.delta", base)

        def weighted_delta(j: int, i: int) -> torch.Tensor:
            torch.sub(read(i), base, out=delta)
            self.sparsify(state, j, i, start, delta)
            return delta.mul_(weights[j])

        elected: torch.Tensor | None = None
        if p.sign_election:
            score = ws.like("taskvec.score", base).zero_()
            sign = ws.like("taskvec.sign", base)
            for j, i in enumerate(others):
                d = weighted_delta(j, i)
                score.add_(d if p.consensus == "sum" else torch.sign(d, out=sign))
            elected = torch.ge(score, 0, out=ws.like("taskvec.elected", base, torch.bool))  # True: +, a tie elects +
        mix = out
        mix.zero_()
        divisor: torch.Tensor | None = None
        if p.normalized and elected is not None:
            divisor = ws.like("taskvec.divisor", base).zero_()
            agreef = ws.like("taskvec.agreef", base)
        if elected is not None:
            pos = ws.like("taskvec.pos", base, torch.bool)
            neg = ws.like("taskvec.neg", base, torch.bool)
            agree = ws.like("taskvec.agree", base, torch.bool)
        for j, i in enumerate(others):
            d = weighted_delta(j, i)
            if elected is None:
                mix.add_(d)
                continue
            torch.where(elected, torch.gt(d, 0, out=pos), torch.lt(d, 0, out=neg), out=agree)
            if divisor is not None:
                agreef.copy_(agree)
                divisor.add_(agreef, alpha=weights[j])  # w * {0, 1} is exact
            mix.add_(d.masked_fill_(agree.logical_not_(), 0.0))
        if p.normalized:
            if divisor is None:
                total = _ordered_sum(weights)
                mix.div_(total if total != 0.0 else 1.0)
            else:
                mix.div_(divisor.masked_fill_(torch.eq(divisor, 0, out=pos), 1.0))
        mix.mul_(p.lambda_)
        mix.add_(base)


def _ordered_sum(values: tuple[float, ...]) -> float:
    """Left-to-right float64 sum (the order a per-element divisor would be summed in)."""
    total = 0.0
    for v in values:
        total += v
    return total


@dataclass
class SelectionState(State):
    """Per non-base input, the exact magnitude selections over its delta x_i - base."""

    selections: list[list[Selection]] = field(default_factory=list)

    def refresh(self) -> None:
        self.done = all(sel.done for sels in self.selections for sel in sels)


class SelectingMethod(TaskVectorMethod):
    """A task-vector method that keeps deltas by exact magnitude rank (TIES, breadcrumbs).

    Subclasses say which top-k selections each input needs (`counts`) and how their masks
    combine (`keep`). Statistic passes feed every unfinished selection with the chunk's
    delta (1 + n reads per chunk); all selections advance together, so a tensor takes as
    many passes as its slowest selection.
    """

    def counts(self, numel: int) -> tuple[int, ...]:
        raise NotImplementedError

    def keep(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """Combine the selections' masks into the keep mask (may overwrite `masks`)."""
        return masks[0]

    @property
    def tensor_passes(self) -> int:
        return MAX_PASSES

    def _begin(self, key: str, numel: int, n_inputs: int) -> SelectionState:
        ks = self.counts(numel)
        sels = [[Selection(numel, k, inert_zeros=True) for k in ks] for _ in self.others(n_inputs)]
        state = SelectionState(key, numel, n_inputs, selections=sels)
        state.refresh()
        return state

    def _observe(self, state: SelectionState, start: int, read: Read) -> int:
        ws = self.workspace
        x = read(self.base)
        base = ws.like("taskvec.base", x).copy_(x)
        delta = ws.like("taskvec.delta", base)
        for j, i in enumerate(self.others(state.n_inputs)):
            if all(sel.done for sel in state.selections[j]):
                continue
            torch.sub(read(i), base, out=delta)
            for sel in state.selections[j]:
                sel.feed(delta, start, ws)
        return base.numel()

    def _end_pass(self, state: SelectionState) -> None:
        for sels in state.selections:
            for sel in sels:
                sel.end_pass()
        state.refresh()

    def _merge(self, a: SelectionState, b: SelectionState) -> None:
        for sa, sb in zip(a.selections, b.selections, strict=True):
            for x, y in zip(sa, sb, strict=True):
                x.merge(y)

    def sparsify(self, state: SelectionState, j: int, i: int, start: int, delta: torch.Tensor) -> None:
        sels = state.selections[j]
        if len(sels) == 1 and sels[0].k == sels[0].numel:
            return  # everything kept
        ws = self.workspace
        masks = [sel.mask(delta, start, out=ws.like(f"taskvec.keep{m}", delta, torch.bool), workspace=ws)
                 for m, sel in enumerate(sels)]
        delta.masked_fill_(self.keep(masks).logical_not_(), 0.0)
