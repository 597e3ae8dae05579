"""What task_arithmetic, ties, dare, della and breadcrumbs share: combining task vectors.

With base b and the other inputs x_1..x_n (input order, the base skipped), weights w_i and
a per-method sparsification s_i (a keep mask, possibly rescaled; identity for task
arithmetic), each element computes

    d_i = w_i * s_i(x_i - b)                       (rounded in this order: sub, sparsify, mul)
    sign election (optional, TIES-style):
        "sum":   S = d_1 + d_2 + ... + d_n         (in input order)
        "count": S = sign(d_1) + ... + sign(d_n)
        elected sign = +1 where S >= 0, else -1    (a tie elects +; a NaN S elects -)
        agree_i = sign(d_i) == elected             (a zero or NaN d_i never agrees)
    without election every input agrees
    m = sum over agreeing i of d_i                 (in input order, from +0)
    normalize: m = m / D with D = the sum of w_i over agreeing i (per element with election,
               one number without), where D == 0 is read as 1
    out = b + lambda * m                            (m * lambda, then + b)

One sweep over the inputs: 1 + n reads per chunk, and each input is sparsified once (for
DARE and DELLA, one draw of its random mask). With sign election the agreeing sum cannot
wait for the elected sign, so the sweep keeps S, the sum of the positive d_i and the sum of
the negative d_i (each in input order from +0, the other elements adding zeros, which
change nothing) and, with normalize, the weights of each side; then each element takes the
side its sign elected. Memory per chunk (workspace buffers besides `out`, which holds the
mix): the base and one input delta (two chunk-sized buffers); with election also S, the
negative sum, one term, a bool mask and the integer mask that picks a side (five more); with
normalize the two weight sums and a bool mask (three more): ten at most, whatever the number
of inputs. Sparsification adds its own (the integer keep mask; TIES: the keep masks and the
magnitude patterns).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..stats import TopKResult, _key_dtype
from ..workspace import Workspace
from ._select import (
    MAX_PASSES,
    STATE_BUDGET,
    Selection,
    _threshold_value,
    band_cap_for,
    chunk_keys_cap,
    feed_group,
    hist_bits_for,
)
from .base import Method, Params, Read, State, chunk_format, cpu_kernels, divide_, input_weights, read_rows, read_source

CONSENSUS = ("sum", "count")
AT_ONCE_MAX = 1 << 15  # the largest tensor SelectingMethod.output_at_once takes (its selection: a partition per input)
GROUP = 8  # inputs per pass of fused_election over a chunk: its sums' traffic is a 1/GROUP of one per input
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def keep_only(x: torch.Tensor, keep: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """In place: x where `keep`, else +0.0 (NaN and inf dropped too)."""
    # An AND of the bit patterns with all-ones or zero: masked_fill_ and torch.where branch per
    # element, and on random masks (DARE, TIES) cost 3.5-4 ns per element on the 2-core VM of
    # the README's benchmarks, against 0.7 ns for this (one thread, 2**20 elements).
    ints = _BITS[x.dtype]
    bits = ws.like("taskvec.keep_bits", x, ints).copy_(keep).neg_()  # True -> -1: all bits set
    return x.view(ints).bitwise_and_(bits).view(x.dtype)


def pick(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """In `a`: a where cond, else b (torch.where(cond, a, b), branch-free as keep_only); b is
    overwritten."""
    ints = _BITS[a.dtype]
    bits = ws.like("taskvec.keep_bits", a, ints).copy_(cond).neg_()
    a.view(ints).bitwise_and_(bits)
    b.view(ints).bitwise_and_(bits.bitwise_not_())
    return a.view(ints).bitwise_or_(b.view(ints)).view(a.dtype)


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
    uses_kernels = True  # the fused CPU passes (_fused.py, rng.drop_delta_) and DARE's and DELLA's masks
    scratch_chunks = 12
    min_inputs = 2

    def check_inputs(self, n_inputs: int) -> None:
        super().check_inputs(n_inputs)
        input_weights(self.name, self.params.weights, n_inputs - 1)

    def sparsify(self, state: State, j: int, i: int, start: int, delta: torch.Tensor) -> None:
        """In place: keep/rescale the delta of input i (the j-th non-base input). Default: keep all."""

    def takes_source(self, state: State, j: int, base: torch.Tensor) -> bool:
        """Whether fused_delta surely takes the j-th non-base input's chunk as read
        (base.read_source: float16 or bfloat16 as it is, no conversion pass). Default: no."""
        return False

    def fused_delta(self, state: State, j: int, i: int, start: int, x: torch.Tensor, base: torch.Tensor,
                    out: torch.Tensor, accumulate: bool) -> bool:
        """Optional fast path: out = sparsify(x - base), or out += it with `accumulate`, in one
        pass, bit for bit the default's sub, sparsify and add (NaN payloads aside: _fused.py).
        False: none here, use the default."""
        return False

    def fused_election(self, state: State, start: int, read: Read, sides: _Sides, weights: tuple[float, ...],
                       lambda_: float) -> bool:
        """Optional fast path for the whole sweep with sign election, the base read by it: every
        input's sides.add(w * sparsify(x - base), w), then sides.finish(lambda_, base), bit for
        bit. False (nothing read): none here."""
        return False

    def output(self, state: State, start: int, read: Read, out: torch.Tensor) -> None:
        p: TaskVectorParams = self.params
        ws = self.workspace
        weights = input_weights(self.name, p.weights, state.n_inputs - 1)
        sides = _Sides(ws, out, p.consensus, p.normalized) if p.sign_election else None
        if sides is not None and self.fused_election(state, start, read, sides, weights, p.lambda_):
            return
        # The base as read, converted once into its buffer (read(), then a copy, converted twice).
        base = ws.like("taskvec.base", out).copy_(read_source(read, self.base))
        delta = ws.like("taskvec.delta", base)
        mix = out if sides is not None else out.zero_()  # _Sides starts its sums itself
        for j, i in enumerate(self.others(state.n_inputs)):  # one sweep: each input read and sparsified once
            x = read_source(read, i) if self.takes_source(state, j, base) else read(i)
            direct = sides is None and weights[j] == 1.0  # the delta goes straight into the mix
            if self.fused_delta(state, j, i, start, x, base, mix if direct else delta, accumulate=direct):
                if direct:
                    continue
            else:
                torch.sub(x, base, out=delta)
                self.sparsify(state, j, i, start, delta)
            d = delta if weights[j] == 1.0 else delta.mul_(weights[j])  # x * 1.0 is x: skip the pass
            if sides is None:
                mix.add_(d)
            else:
                sides.add(d, weights[j])
        if sides is not None:
            sides.finish(p.lambda_, base)
            return
        if p.normalized:
            total = _ordered_sum(weights)
            divide_(mix, total if total != 0.0 else 1.0)
        if p.lambda_ != 1.0:  # x * 1.0 is x: skip the pass
            mix.mul_(p.lambda_)
        mix.add_(base)


class _Sides:
    """Sign election in the same sweep as the mix: the sign is known only once every input
    was seen, so both candidates are summed on the way.

    `mix` sums max(d_i, 0) and `neg` min(d_i, 0), each in input order from +0: the agreeing
    d_i plus zeros, and a zero added to these sums (never -0: they start at +0 and take one
    sign only) changes nothing, so `elect` picking the elected side per element equals the
    sum of the agreeing d_i bit for bit. A NaN d_i goes into the score as it is (with
    "sum" the score is NaN and elects -; with "count" torch.sign(NaN) adds 0), then counts as
    a zero: it never agrees. With `normalize` the weights of each side are
    summed likewise, as w * max(sign(d_i), 0) and -w * min(sign(d_i), 0) (exact).
    Clamps and signs, not comparisons and masks: fewer and branch-free passes over the chunk."""

    def __init__(self, ws: Workspace, mix: torch.Tensor, consensus: str, normalized: bool) -> None:
        self.mix, self.count = mix, consensus == "count"
        self.fused = cpu_kernels(mix)  # recipe.library._fused on the CPU: `add` and `finish` in one pass each
        self.score = ws.like("taskvec.score", mix)
        self.neg = ws.like("taskvec.neg", mix)
        self.term = ws.like("taskvec.term", mix)
        self.is_pos = ws.like("taskvec.is_pos", mix, torch.bool)
        self.ws = ws
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None
        if normalized:
            self.weights = (ws.like("taskvec.pos_w", mix), ws.like("taskvec.neg_w", mix))
            self.is_zero = ws.like("taskvec.is_zero", mix, torch.bool)
        self.started = False  # the sums hold nothing yet: the fused add's first call writes them

    def _start(self) -> None:
        for t in (self.mix, self.score, self.neg, *(self.weights or ())):
            t.zero_()
        self.started = True

    def add(self, d: torch.Tensor, w: float) -> None:
        """Take in d (the caller's buffer: overwritten)."""
        if self.fused is not None and self.fused.supported(d, self.mix):
            # Writing the first terms instead of adding them to +0 changes only the sign of
            # zeros (-0.0 for +0.0) in the score, which elects the same side, and in the
            # weight sums, whose zeros finish reads as 1 either way.
            self.fused.sides_add(d, self.score, self.mix, self.neg, self.count, self.weights, w, first=not self.started)
            self.started = True
            return
        if not self.started:
            self._start()
        self.score.add_(torch.sign(d, out=self.term) if self.count else d)
        d.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)  # a NaN d is on neither side
        self.mix.add_(torch.clamp(d, min=0.0, out=self.term))
        self.neg.add_(torch.clamp(d, max=0.0, out=self.term))
        if self.weights is not None:  # one sign per element; d is spent, so it takes the negative part
            sign = torch.sign(d, out=self.term)
            self.weights[1].add_(torch.clamp(sign, max=0.0, out=d), alpha=-w)
            self.weights[0].add_(sign.clamp_(min=0.0), alpha=w)

    def finish(self, lambda_: float, base: torch.Tensor) -> None:
        """mix = the elected side's sum (divided by its weights with normalize, 0 read as 1),
        times lambda_, plus base."""
        if self.fused is not None and self.fused.supported(self.mix, base):
            self.fused.sides_finish(self.score, self.mix, self.neg, self.weights, lambda_, base)
            return
        elected = torch.ge(self.score, 0, out=self.is_pos)  # True: +; a tie elects +, a NaN score -
        pick(elected, self.mix, self.neg, self.ws)
        if self.weights is not None:
            divisor = pick(elected, *self.weights, self.ws)
            is_zero = self.term.copy_(torch.eq(divisor, 0, out=self.is_zero))
            self.mix.div_(divisor.add_(is_zero))  # a zero divisor (+0 or -0) + 1 = 1; the others + 0
        self.mix.mul_(lambda_)
        self.mix.add_(base)


def _read_into(read: Read, i: int, room: torch.Tensor) -> torch.Tensor:
    """Input i's chunk as read (read_source), at the start of the uint8 `room` (bytes for a chunk
    in the accumulator dtype): read there, or copied there where the reader held it already."""
    x = read_source(read, i, into=room)
    if x.data_ptr() != room.data_ptr():
        x = room[: x.numel() * x.element_size()].copy_(x.view(torch.uint8)).view(x.dtype)
    return x


def _read_groups(read: Read, inputs: list[tuple[int, int]], store: torch.Tensor, slot: int,
                 keep: bool = False) -> Iterator[tuple[list[int], torch.dtype, int, bool]]:
    """The (key, input index) pairs' chunks as read, GROUP at a time, into the uint8 `store`'s
    rows of `slot` bytes (base.read_rows where the reader offers it: one call for GROUP inputs,
    where a call per input cost ~11 us of Python; else _read_into each): yields each run of
    one dtype as (keys, dtype, its first row, whether it is the last), its chunks in rows
    row0, row0 + 1, ... (valid until the next step; with `keep`, the r-th input's chunk is in
    row r, and all of them stay valid)."""
    for w in range(0, len(inputs), GROUP):
        window = inputs[w : w + GROUP]
        first = w if keep else 0
        room = store[first * slot :]
        dtypes = read_rows(read, [i for _, i in window], room, slot)
        if dtypes is None:
            dtypes = [_read_into(read, i, room[r * slot : (r + 1) * slot]).dtype for r, (_, i) in enumerate(window)]
        row0 = 0
        for r in range(1, len(window) + 1):
            if r == len(window) or dtypes[r] != dtypes[row0]:  # a group holds one dtype
                yield [key for key, _ in window[row0:r]], dtypes[row0], first + row0, w + r == len(inputs)
                row0 = r


def _sides_group(sides: _Sides, store: torch.Tensor, members: list[int], dtype: torch.dtype, slot: int,
                 base: torch.Tensor, start: int, results: list[TopKResult], weights: tuple[float, ...],
                 lambda_: float | None) -> None:
    """One run of fused_election's sums (_fused.topk_sides_group): the inputs at positions
    `members`, in rows of the uint8 `store` from its start; with lambda_, the last run."""
    sides.fused.topk_sides_group(store, len(members), dtype, slot, base, start, [results[j] for j in members],
                                 [weights[j] for j in members], sides.score, sides.mix, sides.neg, sides.count,
                                 sides.weights, first=not sides.started, lambda_=lambda_)
    sides.started = True


def _whole_result(numel: int, k: int) -> TopKResult:
    """The selection of k = 0 or k = numel elements (Selection's, which needs no pass)."""
    return TopKResult(numel, k, None, -1 if k else 0, None, numel if k else 0, 0, 0, 0, 0)


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

    scratch_chunks = 20 + GROUP  # and fused_election's group of inputs as read
    state_bytes = STATE_BUDGET

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
        others = self.others(n_inputs)
        n_sel = len(ks) * len(others)  # all of them hold their statistics at once
        limits = {"max_bits": hist_bits_for(numel, n_sel), "keys_cap": chunk_keys_cap(n_sel),
                  "band_cap": band_cap_for(n_sel)}
        ws = self.state_workspace  # lent by the worker, one state alive at a time: a scope per selection
        sels = [[Selection(numel, k, inert_zeros=True, scratch=None if ws is None else ws.scope(f"{j}.{m}"), **limits)
                 for m, k in enumerate(ks)] for j in range(len(others))]
        state = SelectionState(key, numel, n_inputs, selections=sels)
        state.refresh()
        return state

    def _observe(self, state: SelectionState, start: int, read: Read) -> int:
        pending = [sel for sels in state.selections for sel in sels if not sel.done]
        skips = {sel.skip_length(start) for sel in pending}
        if pending and None not in skips and len(skips) == 1:
            return skips.pop()  # tie splits that all look at other chunks: nothing read
        seen = self._observe_grouped(state, start, read)
        if seen is not None:
            return seen
        ws = self.workspace
        x = read(self.base)
        base = ws.like("taskvec.base", x).copy_(x)
        delta = ws.like("taskvec.delta", base)
        n = base.numel()
        for j, i in enumerate(self.others(state.n_inputs)):
            if not any(sel.wants(start, n) for sel in state.selections[j]):
                continue  # done, or a tie split that looks at another chunk: not read
            sels = state.selections[j]
            if len(sels) == 1:  # it subtracts (on the CPU, on the way: no delta buffer, no conversion)
                sels[0].feed(read_source(read, i), start, ws, base=base)
                continue
            torch.sub(read(i), base, out=delta)  # once for all of this input's selections
            for sel in sels:
                sel.feed(delta, start, ws)
        return n

    def _observe_grouped(self, state: SelectionState, start: int, read: Read) -> int | None:
        """A statistic pass's chunk where every input that wants it has one selection (TIES):
        all inputs at once, as read, GROUP per kernel call where they gather their bands
        (_select.feed_group), the base as read too (widened into a chunk of its own only where
        some selection is fed on its own). A chunk that no input wants reads nothing, not even
        the base. None where the reader does not say the chunk's format before reading, or not
        on the CPU, or an input has several selections (breadcrumbs): _observe feeds each input."""
        fmt = chunk_format(read)
        if fmt is None:
            return None
        n, dtype, device = fmt
        ws = self.workspace
        base_room = ws.buffer("taskvec.base", dtype, n, device)  # as bytes: the base as read
        fused = cpu_kernels(base_room)
        if fused is None:
            return None
        inputs: list[tuple[int, int]] = []
        for j, i in enumerate(self.others(state.n_inputs)):
            sels = state.selections[j]
            if len(sels) != 1:
                return None
            if sels[0].wants(start, n):  # else done, or its band missed: this pass reads it no further
                inputs.append((j, i))
        if not inputs:
            return n
        slot = n * base_room.element_size()
        base = _read_into(read, self.base, base_room.view(torch.uint8))
        wide = None  # the base in the accumulator dtype, in the delta's buffer (this path has no delta)
        if not all(state.selections[j][0].gathering for j, _ in inputs):
            wide = ws.buffer("taskvec.delta", dtype, n, device).copy_(base)
        store = ws.buffer("taskvec.group", dtype, GROUP * n, device).view(torch.uint8)  # as fused_election's
        for members, group_dtype, row0, _ in _read_groups(read, inputs, store, slot):
            feed_group(fused, [(state.selections[j][0], row0 + k) for k, j in enumerate(members)], store,
                       group_dtype, slot, base, dtype, wide, start, ws)
        return n

    def output_at_once(self, key: str, numel: int, n_inputs: int, read: Read, out: torch.Tensor) -> bool:
        """On the CPU, for a tensor of at most AT_ONCE_MAX elements whose inputs each have one
        selection (TIES) and sign election: every input read once into rows of one buffer, each
        row's exact selection settled from there in one kernel call (_fused.exact_topk_rows: the
        Selection's result, bit for bit), then fused_election's sums from the same rows. The
        passes cost ~1 ms of Python per tensor, and an SD1.5 checkpoint has ~720 tensors of at
        most 16384 elements: TIES over 8 of them, in-process, 0.88 s that way, 0.42 s this way
        (uniform 0.14 s). A partition costs O(numel) per input: above AT_ONCE_MAX the passes,
        whose band needs no sort, are faster (measured: 2.1 against 2.7 ms per tensor at 32768
        elements, 3.8 against 3.0 at 65536)."""
        ks = self.counts(numel)
        others = self.others(n_inputs)
        fmt = chunk_format(read)
        if (len(ks) != 1 or not self._masks_are_selections or not self.params.sign_election or fmt is None
                or fmt[0] != numel or not 0 < numel <= AT_ONCE_MAX):
            return False
        self.check_inputs(n_inputs)
        n, dtype, device = fmt
        ws = self.workspace
        # Every input's row at once: within the GROUP chunks the budget reserves for the group.
        if len(others) * n > GROUP * max(ws.capacity, n):
            return False
        sides = _Sides(ws, out, self.params.consensus, self.params.normalized)
        if sides.fused is None:  # not on the CPU
            return False
        base_room = ws.buffer("taskvec.base", dtype, n, device)
        p, k = self.params, ks[0]
        slot = n * base_room.element_size()
        base = _read_into(read, self.base, base_room.view(torch.uint8))
        store = ws.buffer("taskvec.group", dtype, max(GROUP, len(others)) * n, device).view(torch.uint8)
        runs = list(_read_groups(read, list(enumerate(others)), store, slot, keep=True))
        key_dtype = _key_dtype(dtype)
        results: list[TopKResult] = [_whole_result(numel, k)] * len(others)  # k = 0 or numel: nothing to settle
        if 0 < k < numel:
            for members, row_dtype, row0, _ in runs:
                settled = sides.fused.exact_topk_rows(store[row0 * slot :], len(members), row_dtype, slot, base, dtype,
                                                      k, True)
                for j, (chosen, greater, equal, kept, cut) in zip(members, settled.tolist(), strict=True):
                    results[j] = TopKResult(numel, k, key_dtype, chosen, _threshold_value(key_dtype, chosen), greater,
                                            equal, kept, cut, 1)
        weights = input_weights(self.name, p.weights, len(others))
        for members, row_dtype, row0, last in runs:
            _sides_group(sides, store[row0 * slot :], members, row_dtype, slot, base, 0, results, weights,
                         p.lambda_ if last else None)
        return True

    def _end_pass(self, state: SelectionState) -> None:
        for sels in state.selections:
            for sel in sels:
                sel.end_pass()
        state.refresh()

    def _merge(self, a: SelectionState, b: SelectionState) -> None:
        for sa, sb in zip(a.selections, b.selections, strict=True):
            for x, y in zip(sa, sb, strict=True):
                x.merge(y)

    def _single_selection(self, state: SelectionState, j: int, dtype: torch.dtype) -> TopKResult | None:
        """Input j's one selection, where its result alone is the keep mask (TIES) of deltas in
        `dtype`, else None."""
        sels = state.selections[j]
        if len(sels) != 1 or not self._masks_are_selections or sels[0].result.dtype not in (None, dtype):
            return None
        return sels[0].result

    @property
    def _masks_are_selections(self) -> bool:
        """Whether each selection's result is its input's keep mask as it is (keep and sparsify
        not overridden: TIES), which the fused kernels take."""
        return type(self).keep is SelectingMethod.keep and type(self).sparsify is SelectingMethod.sparsify

    def takes_source(self, state: SelectionState, j: int, base: torch.Tensor) -> bool:
        return self._single_selection(state, j, base.dtype) is not None and cpu_kernels(base) is not None

    def fused_election(self, state: SelectionState, start: int, read: Read, sides: _Sides,
                       weights: tuple[float, ...], lambda_: float) -> bool:
        """On the CPU, with one selection per input (TIES): GROUP inputs at a time, as read,
        into one buffer, then subtract, mask, weigh and sum them in one pass over the chunk
        whose sums stay in the cache (_fused.topk_sides_group); the last group also picks the
        elected side. Where the inputs' dtypes differ, a group ends at each change. The base
        as read too: the kernel widens it tile by tile (no float32 copy of it)."""
        out = sides.mix
        results = [self._single_selection(state, j, out.dtype) for j in range(state.n_inputs - 1)]
        if sides.fused is None or None in results:
            return False
        n, ws = out.numel(), self.workspace
        base = _read_into(read, self.base, ws.like("taskvec.base", out).view(torch.uint8))
        slot = n * out.element_size()  # bytes per input: room for any dtype that widens to out's
        store = ws.buffer("taskvec.group", out.dtype, GROUP * n, out.device).view(torch.uint8)
        for members, dtype, row0, last in _read_groups(read, list(enumerate(self.others(state.n_inputs))), store,
                                                       slot):
            _sides_group(sides, store[row0 * slot :], members, dtype, slot, base, start, results, weights,
                         lambda_ if last else None)
        return True

    def fused_delta(self, state: SelectionState, j: int, i: int, start: int, x: torch.Tensor, base: torch.Tensor,
                    out: torch.Tensor, accumulate: bool) -> bool:
        """On the CPU, with one selection per input (TIES): subtract, mask and drop (and add) in
        one pass (_fused.topk_delta). Otherwise the default."""
        result = self._single_selection(state, j, base.dtype)
        kernels = None if result is None else cpu_kernels(out, base, source=x)
        if kernels is None:
            return False
        kernels.topk_delta(out, x, base, start, result, accumulate=accumulate)
        return True

    def sparsify(self, state: SelectionState, j: int, i: int, start: int, delta: torch.Tensor) -> None:
        sels = state.selections[j]
        if len(sels) == 1 and sels[0].k == sels[0].numel:
            return  # everything kept
        ws = self.workspace
        masks = [sel.mask(delta, start, out=ws.like(f"taskvec.keep{m}", delta, torch.bool), workspace=ws)
                 for m, sel in enumerate(sels)]
        keep_only(delta, self.keep(masks), ws)
