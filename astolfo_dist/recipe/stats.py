"""Exact streaming top-k by magnitude: what TIES (and DELLA's ranking) needs per tensor.

Keep the k largest |x| of a tensor exactly, without holding the tensor: a radix selection
over the bit patterns of |x|. A non-negative IEEE float orders like its bit pattern read as
an unsigned integer, so the k-th largest |x| is found a few bits at a time. Each pass
streams over the chunks and keeps one histogram (at most 2**max_bits counts) of the next
bits of the elements that share the prefix found so far.

* float16 / bfloat16: 15-bit patterns, 2 passes (8 + 7 bits).
* float32: 31 bits, 3 passes (11 + 10 + 10).
* float64: 63 bits, 6 passes.
* other float dtypes (float8) are widened to float32 (exactly) first.

Ties: if elements equal to the threshold have to be split (some kept, some not), equal
elements are kept in element-index order. The cut-off index is then found in one more pass
that stops as soon as it is known, so the final mask is a pure function of
(chunk, start) and can be applied to chunks in any order, split in any way.

NaN counts as larger than every number (as torch.topk does), every NaN ties with every
other NaN, and -0.0 ties with +0.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .workspace import Workspace


@dataclass(frozen=True)
class _Pattern:
    """How |x| of one float dtype maps to a non-negative integer of `bits` bits."""

    int_dtype: torch.dtype
    bits: int
    inf: int  # the pattern of +inf; every NaN is clamped to inf + 1


_PATTERNS: dict[torch.dtype, _Pattern] = {
    torch.float16: _Pattern(torch.int16, 15, 0x7C00),
    torch.bfloat16: _Pattern(torch.int16, 15, 0x7F80),
    torch.float32: _Pattern(torch.int32, 31, 0x7F800000),
    torch.float64: _Pattern(torch.int64, 63, 0x7FF0000000000000),
}


def _key_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"top-k by magnitude needs a float tensor, got {dtype}")
    return dtype if dtype in _PATTERNS else torch.float32


def magnitude_bits(
    x: torch.Tensor, out: torch.Tensor | None = None, workspace: Workspace | None = None
) -> torch.Tensor:
    """|x| as non-negative integers that order like |x| (flattened, element-index order).

    `out`: where to write them (x.numel() elements of the pattern's integer dtype or a wider
    one, e.g. int64); `workspace`: scratch for widening float8 (else allocated)."""
    kd = _key_dtype(x.dtype)
    pat = _PATTERNS[kd]
    flat = x.reshape(-1)
    if flat.dtype != kd:  # float8 -> float32 is exact
        flat = flat.to(kd) if workspace is None else workspace.like("magnitude_bits.widen", flat, kd).copy_(flat)
    sign_cleared = (1 << pat.bits) - 1
    if out is None:
        bits = flat.view(pat.int_dtype) & sign_cleared
    elif out.dtype == pat.int_dtype:
        bits = torch.bitwise_and(flat.view(pat.int_dtype), sign_cleared, out=out)
    else:  # widen first (sign-extended; the mask clears the extension): an `out=` of another
        bits = out.copy_(flat.view(pat.int_dtype)).bitwise_and_(sign_cleared)  # dtype costs a temporary
    return bits.clamp_max_(pat.inf + 1)  # one NaN pattern, so all NaNs tie


def _split_widths(total: int, max_bits: int) -> tuple[int, ...]:
    """`total` bits in as few passes as possible, no pass wider than `max_bits`, wider first."""
    n = -(-total // max_bits)
    base, extra = divmod(total, n)
    return tuple(base + 1 if i < extra else base for i in range(n))


def k_for_density(numel: int, density: float) -> int:
    """k = ceil(density * numel), with density read as the decimal it was written as.

    Fraction(str(0.1)) is exactly 1/10, so density 0.1 of 10 elements keeps 1, not 2 (the
    binary double 0.1 is a hair above 1/10).
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    return min(numel, math.ceil(Fraction(str(float(density))) * numel))


@dataclass(frozen=True)
class TopKResult:
    """Which elements are the k largest by magnitude.

    An element is kept if its magnitude pattern is greater than `threshold_bits`, or equal to
    it and its index is below `cut_index`. `threshold` is the k-th largest |x| itself (None
    when k is 0 or numel: no pass was needed). `n_greater + n_equal_to_keep == k`.
    """

    numel: int
    k: int
    dtype: torch.dtype | None  # the dtype whose bit patterns were compared; None for k = 0 or numel
    threshold_bits: int
    threshold: float | None
    n_greater: int
    n_equal: int  # elements with |x| equal to the threshold
    n_equal_to_keep: int
    cut_index: int
    passes: int  # passes over the chunks it took

    def mask(
        self, chunk: torch.Tensor, start: int, *, out: torch.Tensor | None = None, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """Bool mask (shape of `chunk`) of the kept elements among [start, start + chunk.numel()).

        With `out` (a bool tensor of chunk.numel() elements) it is written there, 1-D; with
        `workspace`, the temporaries come from it (tags "topk.*")."""
        if self.k == 0 or self.k == self.numel:
            if out is not None:
                return out.fill_(self.k > 0)
            return torch.full(chunk.shape, self.k > 0, dtype=torch.bool, device=chunk.device)
        if _key_dtype(chunk.dtype) != self.dtype:
            raise TypeError(f"chunk dtype {chunk.dtype} differs from the selection's {self.dtype}")
        n = chunk.numel()

        def scratch(tag: str, dtype: torch.dtype) -> torch.Tensor | None:
            return None if workspace is None else workspace.buffer(tag, dtype, n, chunk.device)

        bits = magnitude_bits(chunk, scratch("topk.bits", _PATTERNS[self.dtype].int_dtype), workspace)
        keep = torch.gt(bits, self.threshold_bits, out=out.view(-1) if out is not None else None)
        if self.cut_index > start and self.n_equal_to_keep:
            tied = torch.eq(bits, self.threshold_bits, out=scratch("topk.tied", torch.bool))
            if self.cut_index < start + n:
                tied[self.cut_index - start :] = False  # ties are kept in index order, up to the cut
            keep |= tied
        return keep if out is not None else keep.reshape(chunk.shape)


@dataclass
class TopKThreshold:
    """Streaming exact selection of the k largest |x| of a tensor of `numel` elements.

    Usage: while not `done`: feed every chunk of the tensor in element order, then call
    `end_pass()`; a pass may stop early once `pass_satisfied` is true. Then read `result`.
    Memory: one histogram of at most 2**max_bits counts.
    """

    numel: int
    k: int
    max_bits: int = 12
    _dtype: torch.dtype | None = field(default=None, init=False)
    _widths: tuple[int, ...] = field(default=(), init=False)
    _pass: int = field(default=0, init=False)  # histogram passes finished
    _prefix: int = field(default=0, init=False)  # the known high bits of the k-th pattern
    _known: int = field(default=0, init=False)  # how many high bits are known
    _need: int = field(default=0, init=False)  # how many to keep among those sharing the prefix
    _n_greater: int = field(default=0, init=False)
    _hist: torch.Tensor | None = field(default=None, init=False)
    _seen: int = field(default=0, init=False)  # elements fed in this pass
    _tie_seen: int = field(default=0, init=False)
    _result: TopKResult | None = field(default=None, init=False)
    _threshold_bits: int = field(default=0, init=False)
    _n_equal: int = field(default=0, init=False)
    _cut: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.numel < 0 or not 0 <= self.k <= self.numel:
            raise ValueError(f"need 0 <= k <= numel, got k={self.k}, numel={self.numel}")
        if not 1 <= self.max_bits <= 16:
            raise ValueError(f"max_bits must be in 1..16, got {self.max_bits}")
        self._need = self.k
        if self.k == 0:
            # Trivial selections need no pass (dtype None): TopKResult.mask answers them directly.
            self._finish(None, 0, 0, 0, 0, 0)
        elif self.k == self.numel:
            self._finish(None, -1, self.numel, 0, 0, 0)

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> TopKResult:
        if self._result is None:
            raise RuntimeError("the selection needs more passes")
        return self._result

    @property
    def in_tie_pass(self) -> bool:
        """The histogram passes are over; this pass looks for the index of the last kept tie."""
        return bool(self._widths) and self._known == sum(self._widths)

    @property
    def pass_satisfied(self) -> bool:
        """No more chunks are needed in this pass."""
        return self._cut is not None

    @property
    def histogram_bins(self) -> int:
        return 0 if self._hist is None else self._hist.numel()

    def feed(self, chunk: torch.Tensor) -> None:
        """The next chunk of the tensor, in element order."""
        if self.done:
            raise RuntimeError("the selection is complete; read result")
        kd = _key_dtype(chunk.dtype)
        if self._dtype is None:
            self._dtype = kd
            self._widths = _split_widths(_PATTERNS[kd].bits, self.max_bits)
        elif kd != self._dtype:
            raise TypeError(f"chunk dtype {chunk.dtype} differs from the earlier chunks' ({self._dtype})")
        bits = magnitude_bits(chunk)
        start = self._seen
        self._seen += bits.numel()
        if self._seen > self.numel:
            raise ValueError(f"more than numel={self.numel} elements fed in one pass")
        if self.in_tie_pass:
            self._feed_ties(bits, start)
        else:
            self._feed_histogram(bits)

    def _feed_histogram(self, bits: torch.Tensor) -> None:
        total = _PATTERNS[self._dtype].bits
        width = self._widths[self._pass]
        low = total - self._known - width  # bits below this pass's digit
        if self._known:
            bits = bits[(bits >> (total - self._known)) == self._prefix]
        digit = ((bits >> low) & ((1 << width) - 1)).to(torch.int64)
        counts = torch.bincount(digit, minlength=1 << width)
        if self._hist is None:
            self._hist = counts
        else:
            self._hist += counts.to(self._hist.device)

    def _feed_ties(self, bits: torch.Tensor, start: int) -> None:
        if self._cut is not None:
            return
        tied = bits == self._threshold_bits
        count = int(tied.sum())
        wanted = self._need - self._tie_seen  # ties still to keep, >= 1
        if count >= wanted:
            position = int(torch.nonzero(tied).reshape(-1)[wanted - 1])
            self._cut = start + position + 1
        self._tie_seen += count

    def end_pass(self) -> None:
        if self.done:
            raise RuntimeError("the selection is complete; read result")
        if self.in_tie_pass:
            if self._cut is None:
                raise ValueError(f"the tie pass saw only {self._tie_seen} of {self._n_equal} tied elements")
            self._finish(self._dtype, self._threshold_bits, self._n_greater, self._n_equal, self._need, self._cut)
            return
        if self._seen != self.numel:
            raise ValueError(f"a pass fed {self._seen} elements, expected numel={self.numel}")
        assert self._hist is not None and self._dtype is not None
        width = self._widths[self._pass]
        counts = self._hist.tolist()
        above = 0
        digit = (1 << width) - 1
        while above + counts[digit] < self._need:  # the k-th largest lies in the highest digit that reaches need
            above += counts[digit]
            digit -= 1
        self._n_greater += above
        self._need -= above
        self._prefix = (self._prefix << width) | digit
        self._known += width
        self._pass += 1
        self._hist = None
        self._seen = 0
        if self._known == _PATTERNS[self._dtype].bits:
            self._threshold_bits = self._prefix
            self._n_equal = counts[digit]
            if self._need == self._n_equal:  # every tie is kept: no tie pass needed
                self._finish(self._dtype, self._prefix, self._n_greater, self._n_equal, self._need, self.numel)

    def _finish(
        self,
        dtype: torch.dtype | None,
        threshold_bits: int,
        n_greater: int,
        n_equal: int,
        n_equal_to_keep: int,
        cut: int,
    ) -> None:
        threshold = None
        if dtype is not None:
            pat = _PATTERNS[dtype]
            threshold = float(torch.tensor([threshold_bits], dtype=torch.int64).to(pat.int_dtype).view(dtype).item())
        passes = self._pass + (1 if self._cut is not None else 0)
        self._result = TopKResult(
            numel=self.numel,
            k=self.k,
            dtype=dtype,
            threshold_bits=threshold_bits,
            threshold=threshold,
            n_greater=n_greater,
            n_equal=n_equal,
            n_equal_to_keep=n_equal_to_keep,
            cut_index=cut,
            passes=passes,
        )


@dataclass(frozen=True)
class TopKMask:
    """mask(chunk, start) -> bool tensor; exactly k elements are True over the whole tensor."""

    result: TopKResult

    def __call__(self, chunk: torch.Tensor, start: int) -> torch.Tensor:
        return self.result.mask(chunk, start)


def exact_topk_mask(
    chunks_factory: Callable[[], Iterable[torch.Tensor]], numel: int, k: int, *, max_bits: int = 12
) -> TopKMask:
    """Run the selection passes; `chunks_factory()` yields the tensor's chunks in element order
    and is called once per pass (the chunks are re-read, never kept)."""
    sel = TopKThreshold(numel, k, max_bits=max_bits)
    while not sel.done:
        for chunk in chunks_factory():
            sel.feed(chunk)
            if sel.pass_satisfied:
                break
        sel.end_pass()
    return TopKMask(sel.result)
