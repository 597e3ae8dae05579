"""Exact top-k by magnitude, as a mergeable, order-free state: what TIES and breadcrumbs need.

recipe/stats.py defines the selection (the k largest |x|, ties kept in element-index order,
NaN above everything, -0.0 equal to +0.0) and its result type, `TopKResult`, whose `mask`
answers any chunk at any offset. Its `TopKThreshold` driver needs the chunks in element order
within a pass and cannot be split between workers, so this module drives the same radix
selection with statistics that are sums and sets:

* a histogram pass counts the next digit of the magnitude patterns that share the prefix
  found so far (integer counts: any order, any split, merged exactly) and the smallest and
  largest pattern seen: if they agree, every element sharing the prefix has that one pattern
  and the pass settles it (a tensor of zeros, or of one repeated value, costs one pass);
* digits are as wide as `max_bits` allows (16 by default), so a float32 magnitude (31 bits)
  takes two histogram passes (16 + 15 bits), the second of which settles the pattern; a
  tensor's digits are narrower when it is small (at most numel / 8 bins: two passes from
  2**19 elements on, which hold most of the bytes of SD and LLM checkpoints);
* once the elements sharing the prefix number at most `COLLECT_CAP`, one collect pass gathers
  them all as (pattern, index) pairs, and ranking them settles both the threshold and which
  tied elements are kept (a set: merged by concatenation, ranked by torch after); a tensor of
  at most `COLLECT_CAP` elements is settled by a single collect pass;
* if the threshold is settled but only some of the tied elements are kept, the kept ones are
  the first in index order: the same radix selection runs over their indices (the smallest
  first), where stats.py would stop a sequential pass at the cut. The pass that settled the
  threshold noted, per chunk, how many keys share the prefix and (if they are few) their
  distinct keys, so the tie count of every chunk is known: the index passes then look at the
  one chunk holding the cut (`wants` and `skip_length` let a caller skip reading the others).
  Deltas of float16 or bfloat16 checkpoints tie at the threshold almost always, so without
  this most tensors took a third pass over every input. (Not for float16 or bfloat16 keys
  themselves, whose one settling pass has no prefix to narrow the records down: their tie
  split reads every chunk. The methods' keys are float32 or float64 deltas.) With `inert_zeros`, ties at
  |x| = 0 are never split (all zeros are kept): a caller for which a zero contributes nothing
  (TIES, breadcrumbs: a zero delta adds nothing and never agrees with an elected sign) gets
  the same output without the index passes.

The first pass's band (CPU kernels only; a GPU takes the passes above). An exact k-th
largest needs two passes over data it cannot hold, unless a guess is right: the first digits
of the first chunk a copy of the state sees (of a sample of about SAMPLE of its keys, where the
band's room allows for the sample's error: `_open_band`) give an estimate of the digit holding
the threshold; the band is the digits around it (`_choose_band`: a few binomial deviations of
the estimate and BAND_MARGIN of the chunk each side, within BAND_BUDGET). The pass then only
gathers every key in the band with its index and counts the keys above it
(`_fused.band_gather`: no histogram beside it, which cost 0.75 ns per element more). At the
end, if above < need <= above + gathered, ranking the gathered keys settles the threshold and
the tie split at once: one statistic pass. `_check_band` drops a band as soon as it cannot
hold the threshold (more keys above it than needed, too few left, more keys in it than its
room), or from a quarter of the tensor on, once the threshold's rank has left the keys it
gathered so far (deltas that vary along the tensor); the rest of that pass is then not read
(`wants`), and the pass is repeated without a band. Bands of copies that saw different first
chunks merge to the digits both gathered. Deltas alike along a tensor (the benchmark's
inputs) take one pass; deltas that vary along it a quarter of one (or, where they change
late, most of one), then the two of the histogram passes.

Typical passes: 1 on the CPU where the band holds the threshold; else 2 for float32
magnitudes of real tensors (1 for tensors of one value, or of at most COLLECT_CAP elements),
plus a tie split over one chunk; at most `MAX_PASSES`. Why the wide first digit: every pass
re-reads all inputs and recomputes their deltas, so a third pass cost TIES a third more time
(benchmarks/methods.py). State per selection: one histogram
of 2**max_bits int32 counts during a pass (256 KiB at 16 bits; callers holding many
selections at once lower max_bits so that a tensor's histograms stay within HIST_BUDGET, see
`hist_bits_for`), or at most COLLECT_CAP candidate pairs (16 KiB), and the settling pass's
per-chunk records: a few numbers per chunk, and distinct keys within CHUNK_KEYS_BUDGET for
all selections of a tensor (`chunk_keys_cap`); in the first pass, the band's keys and
indices within BAND_BUDGET for all selections of a tensor (`band_cap_for`). STATE_BUDGET is
their sum, which `--memory` reserves per worker (Method.state_bytes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..stats import _PATTERNS, TopKResult, _key_dtype, _split_widths, magnitude_bits
from ..workspace import Workspace
from .base import cpu_kernels

MAX_HIST_BITS = 16
MIN_HIST_BITS = 11  # 2048 bins: float32 magnitudes in at most 3 digits
HIST_BUDGET = 8 << 20  # bytes of histograms that the selections of one tensor hold at once
COLLECT_CAP = 1024
CHUNK_KEYS_BUDGET = 4 << 20  # bytes of per-chunk tie records (16 per key) the selections of one tensor hold
BAND_BUDGET = 32 << 20  # bytes of first-pass band candidates (BAND_ENTRY each) the selections of one tensor hold
BAND_ENTRY = 16  # bytes per band candidate, as held (an int64 key and an int64 index)
# What the selections of one tensor hold at most: the band twice, for its ranking's and merging's temporaries.
STATE_BUDGET = HIST_BUDGET + CHUNK_KEYS_BUDGET + 2 * BAND_BUDGET
BAND_SIGMAS = 4.0  # the band's half-width: this many binomial standard deviations of the first chunk's estimate
BAND_MARGIN = 0.005  # plus this fraction of the first chunk's elements, for deltas that vary along a tensor
SAMPLE = 1 << 16  # about this many keys of the first chunk (all of a smaller one) choose the band
MAX_INDEX_BITS = 62  # rng.py's element-index range
MAX_PASSES = 1 + -(-63 // MIN_HIST_BITS) + -(-MAX_INDEX_BITS // MIN_HIST_BITS)  # 1: a band that missed


def chunk_keys_cap(selections: int = 1) -> int:
    """Distinct keys per selection that a settling pass may record, `selections` at once."""
    return max(256, CHUNK_KEYS_BUDGET // (16 * max(1, selections)))


def band_cap_for(selections: int = 1) -> int:
    """First-pass band candidates per selection, `selections` at once."""
    return BAND_BUDGET // (BAND_ENTRY * max(1, selections))


def hist_bits_for(numel: int, selections: int = 1) -> int:
    """The widest digit for a tensor of `numel` elements when `selections` of it run at once:
    at most numel / 8 bins, and all their int32 histograms within HIST_BUDGET."""
    by_size = numel.bit_length() - 4
    by_budget = (HIST_BUDGET // (4 * max(1, selections))).bit_length() - 1
    return max(MIN_HIST_BITS, min(MAX_HIST_BITS, by_size, by_budget))


def _threshold_value(dtype: torch.dtype, bits: int) -> float:
    # numpy: torch's tensor, cast, view and item took 20 us a call
    floats, ints = {32: (np.float32, np.int32), 64: (np.float64, np.int64), 16: (None, np.int16)}[
        torch.finfo(dtype).bits]
    if floats is None:  # float16 / bfloat16 patterns: torch knows bfloat16, numpy does not
        return float(torch.tensor([bits], dtype=torch.int64).to(torch.int16).view(dtype).item())
    return float(np.array([bits], dtype=np.int64).astype(ints).view(floats)[0])


@dataclass
class Selection:
    """The k largest |x| of a tensor of numel elements; `result` once `done`."""

    numel: int
    k: int
    dtype: torch.dtype | None = None
    stage: str = "magnitude"  # "magnitude": radix over |x| patterns; "index": over tied indices
    collect: bool = False  # this pass gathers candidates instead of counting digits
    prefix: int = 0
    known: int = 0
    need: int = 0  # elements still to keep among those sharing the prefix
    n_greater: int = 0
    threshold_bits: int = 0
    n_equal: int = 0
    keep_equal: int = 0  # how many of the n_equal tied elements are kept
    inert_zeros: bool = False  # |x| = 0 changes nothing downstream: never split ties at zero
    max_bits: int | None = None  # the widest digit; None: hist_bits_for(numel)
    keys_cap: int | None = None  # the most per-chunk distinct keys recorded; None: chunk_keys_cap()
    band_cap: int | None = None  # the most first-pass band candidates; None: band_cap_for(); 0: no band
    # Where the histograms and the band's room come from (a scope of the worker's state
    # workspace for this selection alone: reused from tensor to tensor); None: allocated per pass.
    scratch: Workspace | None = field(default=None, repr=False, compare=False)
    # This pass's counts per digit (int32, int64 for huge tensors) and the smallest and largest
    # key it saw (if they agree, every key sharing the prefix is that one), on the chunks'
    # device until end_pass reads them: on a GPU, no synchronisation per chunk.
    hist: torch.Tensor | None = None
    kmin: torch.Tensor | None = None
    kmax: torch.Tensor | None = None
    cand_key: torch.Tensor | None = None  # collect: the candidates' keys (CPU int64)
    cand_index: torch.Tensor | None = None  # collect, magnitude stage: their element indices
    # Per chunk of this magnitude pass: (start, n, how many keys share the prefix, and in the
    # pass that can settle the key, their distinct keys and counts), so that a tie split can
    # then look at the one chunk holding the cut (`window`) instead of the whole tensor.
    chunks: list[tuple[int, int, int, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    chunk_keys: bool = True  # False once the distinct keys outgrew keys_cap
    window: tuple[int, int] | None = None  # index stage: only elements [lo, hi) hold kept ties
    grid: dict[int, int] | None = None  # with a window: the settling pass's chunks, start -> length
    # The first pass's band (CPU kernels only): the digits [lo, hi] around where the first chunk
    # this copy saw puts the threshold. Beside the histogram (and, once _check_band confirms
    # the band, instead of it), the pass gathers every key in them with its index and counts
    # the keys above: if the threshold is in the band, ranking its keys settles the selection
    # in that one pass, ties included (_settle_from_band); if not, the histogram goes on, or
    # if it had stopped, the pass is repeated as a histogram pass.
    band_open: bool = True  # not chosen yet: this copy saw no chunk of the first pass
    band: tuple[int, int] | None = None  # None once chosen: no band (it missed, overflowed, or none fits)
    band_key: torch.Tensor | None = None  # CPU int64, the first band_count entries in use
    band_index: torch.Tensor | None = None
    band_count: int = 0
    band_room: int = 0  # entries allocated: twice what the first chunk predicts, at most band_cap
    band_above: int = 0  # keys above the band
    band_seen: int = 0  # elements the band has looked at
    uncounted: bool = False  # the band alone counts this pass: it settles the selection, or the pass repeats
    passes: int = 0
    result: TopKResult | None = field(default=None)

    def __post_init__(self) -> None:
        if not 0 <= self.k <= self.numel:
            raise ValueError(f"need 0 <= k <= numel, got k={self.k}, numel={self.numel}")
        self.need = self.k
        if self.max_bits is None:
            self.max_bits = hist_bits_for(self.numel)
        if self.keys_cap is None:
            self.keys_cap = chunk_keys_cap()
        if self.band_cap is None:
            self.band_cap = band_cap_for()
        self.collect = self.numel <= COLLECT_CAP  # small tensors: one collect pass settles everything
        self.band_open = not self.collect and self.band_cap > 0
        if self.k == 0:
            self._finish(None, 0, 0, 0, 0, 0)
        elif self.k == self.numel:
            self._finish(None, -1, self.numel, 0, 0, 0)

    @property
    def done(self) -> bool:
        return self.result is not None

    def _width(self) -> int:
        return _PATTERNS[self.dtype].bits if self.stage == "magnitude" else self._index_bits()

    def _index_bits(self) -> int:
        return max(1, (self.numel - 1).bit_length())

    def _digit_bits(self) -> int:
        """This pass's digit: the stage's width split as evenly as max_bits allows, wider first
        (the same split on every worker: it depends on numel, dtype and max_bits only)."""
        done = 0
        for bits in _split_widths(self._width(), self.max_bits):
            if done == self.known:
                return bits
            done += bits
        raise RuntimeError("the selection has no digit left")  # a full prefix settles in its pass

    def feed(self, x: torch.Tensor, start: int, workspace: Workspace | None = None,
             base: torch.Tensor | None = None) -> None:
        """Elements [start, start + x.numel()) of the tensor, any chunk, any order, once per pass;
        with `base`, of the tensor x - base (torch.sub's, in base's dtype: x may be an input
        chunk as read, base.read_source; on the CPU's fused pass, subtracted on the way
        instead of in a buffer of its own).

        With `workspace`, the chunk-sized temporaries come from it (tags "select.*")."""
        if self.done:
            return
        self._take_dtype((x if base is None else base).dtype)  # with base, x may be a narrower source
        if self.window is not None:  # index stage: only the chunk holding the cut matters
            lo, hi = max(start, self.window[0]), min(start + x.numel(), self.window[1])
            if lo >= hi:
                return
            if base is not None:
                base = base.reshape(-1)[lo - start : hi - start]
            x, start = x.reshape(-1)[lo - start : hi - start], lo
        n = x.numel()

        def scratch(tag: str, dtype: torch.dtype) -> torch.Tensor:
            if workspace is None:
                return torch.empty(n, dtype=dtype, device=x.device)
            return workspace.buffer(tag, dtype, n, x.device)

        def positions(mask: torch.Tensor) -> torch.Tensor:
            """Indices of the True elements, into a buffer: nonzero sizes its `out`, and a view
            with no elements grows within the buffer's storage (no allocation, no warning)."""
            where = scratch("select.where", torch.int64)[:0].view(0, 1)
            return torch.nonzero(mask, out=where).view(-1)

        # Keys in int32 where they fit (half the memory traffic of int64), index keys of the tie
        # split too: sharing the magnitude stage's dtype, they share its scratch buffers.
        key_int = torch.int64 if _PATTERNS[self.dtype].bits > 31 else torch.int32
        fusable = self.stage == "magnitude" and not self.collect
        kernels = (cpu_kernels(x) if base is None else cpu_kernels(base, source=x)) if fusable else None
        if kernels is not None:
            self._feed_histogram_fused(kernels, x.reshape(-1), None if base is None else base.reshape(-1), start,
                                       scratch, key_int)
            return
        if self.band_open or self.band is not None:
            self._band_off()  # the torch path gathers no band
        if base is not None:
            x = torch.sub(x, base, out=scratch("select.delta", base.dtype))
        bits = magnitude_bits(x, scratch("select.bits", key_int), workspace)
        if self.stage == "magnitude":
            keys = bits
        else:  # ties at the threshold to split: rank their indices, the smallest first
            ties = positions(torch.eq(bits, self.threshold_bits, out=scratch("select.mask", torch.bool)))
            index_int = key_int if self._index_bits() <= 31 else torch.int64
            keys = scratch("select.keys", index_int)[: ties.numel()].copy_(ties).neg_()
            keys.add_((1 << self._index_bits()) - 1 - start)  # (2**bits - 1) - (start + position)
        width = self._width()
        index: torch.Tensor | None = None  # the candidates' element indices (magnitude collect)
        if self.known:  # only the keys sharing the prefix found so far
            m = keys.numel()
            shifted = torch.bitwise_right_shift(keys, width - self.known, out=scratch("select.digits", keys.dtype)[:m])
            inside = positions(torch.eq(shifted, self.prefix, out=scratch("select.mask", torch.bool)[:m]))
            if self.collect and self.stage == "magnitude":
                index = inside.add(start)
            keys = torch.index_select(keys, 0, inside, out=scratch("select.picked", keys.dtype)[: inside.numel()])
        if self.collect:  # at most COLLECT_CAP keys share the prefix: gather them
            if self.stage == "magnitude" and index is None:  # a tensor of at most COLLECT_CAP elements
                index = torch.arange(start, start + n, device=keys.device)
            # Copies: the state must not hold a view of the workspace.
            self._append(keys.to("cpu", dtype=torch.int64, copy=True), None if index is None else index.cpu())
            return
        digit_bits = self._digit_bits()
        if self.stage == "magnitude":
            self._record_chunk(start, n, keys.numel(), keys, final=self.known + digit_bits == width)
        bins = 1 << digit_bits
        digits = scratch("select.digits", keys.dtype)[: keys.numel()]
        torch.bitwise_right_shift(keys, width - self.known - digit_bits, out=digits).bitwise_and_(bins - 1)
        if self.hist is None:  # counted in place: bincount would allocate int64 bins per chunk
            self.hist = self._zeroed("hist", self._count_dtype(), bins, digits.device)
        ones = torch.ones(1, dtype=self.hist.dtype, device=digits.device)
        self.hist.index_add_(0, digits, ones.expand(digits.numel()))  # integer sums: any order, same counts
        if keys.numel():
            self._see(*torch.aminmax(keys))

    def _take_dtype(self, delta_dtype: torch.dtype) -> None:
        kd = _key_dtype(delta_dtype)
        if self.dtype is None:
            self.dtype = kd
        elif kd != self.dtype:
            raise TypeError(f"chunk dtype {delta_dtype} differs from the earlier chunks' ({self.dtype})")

    def _feed_histogram_fused(self, fused, x: torch.Tensor, base: torch.Tensor | None, start: int, scratch,
                              key_int: torch.dtype) -> None:
        """The magnitude histogram pass of `feed` in one pass over the chunk (_fused.digit_histogram):
        the same counts, extremes and records as the torch operations it stands for. A first
        pass whose first chunk chose a band (_open_band) counts nothing but the band
        (_fused.band_gather)."""
        if self.band_open and x.numel() and self._open_band(fused, x, base):
            self._band_gather(fused, x, base, start)
            return
        if self.uncounted:  # the band alone counts (once it missed, nothing does: the pass is repeated)
            if self.band is not None:
                self._band_gather(fused, x, base, start)
            return
        width, digit_bits = self._width(), self._digit_bits()
        final = self.known + digit_bits == width
        keys_out = scratch("select.picked", key_int) if final and self.known and self.chunk_keys else None
        if self.hist is None:
            self.hist = self._zeroed("hist", self._count_dtype(), 1 << digit_bits, torch.device("cpu"))
        count, lo, hi = fused.digit_histogram(x, self.known, self.prefix, width, digit_bits, self.hist, keys_out,
                                              base=base)
        self._record_chunk(start, x.numel(), count, None if keys_out is None else keys_out[:count], final=final)
        if count:
            self._see(torch.tensor(lo), torch.tensor(hi))

    def _open_band(self, fused, x: torch.Tensor, base: torch.Tensor | None) -> bool:
        """The first chunk this copy sees in a first pass: from the first digits of its keys,
        the band (_choose_band); if one fits, the pass counts the band alone (this chunk's keys
        in it are the caller's to gather). False if none fits: the pass is a histogram pass,
        this chunk included.
        The digits are counted for a sample of the chunk (about SAMPLE keys, in blocks spread
        over it) where the band's room allows for the sample's error, else for all its keys:
        a large tensor's band is narrow (its keys within band_cap), and there the first chunk
        is a small part of the tensor (measured: 35 of 7994 selections of the benchmark's TIES
        missed with samples everywhere, none this way)."""
        self.band_open = False
        n, shift = x.numel(), self._band_shift()
        every = max(1, n // SAMPLE) * fused.SAMPLE_BLOCK
        if 2 * self._band_spread(n, n * fused.SAMPLE_BLOCK / every) > self._band_room_in(n):
            every = fused.SAMPLE_BLOCK
        sample = self._zeroed("hist", torch.int32, 1 << self._digit_bits(), torch.device("cpu"))
        sampled, kmax = fused.sample_histogram(x, base, shift, sample, every)
        self._choose_band(fused, sample, sampled, n, kmax >> shift)
        if self.band is None:
            return False
        self.uncounted = True
        return True

    def _choose_band(self, fused, counts: torch.Tensor, sampled: int, n: int, top_digit: int) -> None:
        """From the histogram of `sampled` keys of the first chunk (of n; no key's digit above
        `top_digit`), the digits around where the chunk's share of `need` falls: BAND_SIGMAS
        binomial deviations of that estimate (the chunk's own against the tensor's, and the
        sample's against the chunk's) and BAND_MARGIN of the chunk each side, narrowed while
        the keys they would gather over the whole tensor (as the sample predicts) exceed half
        of band_cap. None fits: no band, and this is a histogram pass."""
        estimate = self.need * n / self.numel
        spread, room = self._band_spread(n, sampled), self._band_room_in(n)
        scale = sampled / n
        while True:
            top = max(1, math.floor(estimate - spread))
            bottom = min(n, max(top, math.ceil(estimate + spread)))
            lo, hi, inside = fused.band_digits(counts, max(1, math.floor(top * scale)),
                                               max(1, math.ceil(bottom * scale)), top_digit)
            inside /= scale  # as many of the chunk's keys
            if inside <= room:
                self.band = (lo, hi)
                self.band_room = min(self.band_cap, self.numel, max(1024, math.ceil(2 * inside * self.numel / n)))
                return
            if spread < 1:
                return  # one digit holds more than the cap allows
            spread /= 2

    def _band_spread(self, n: int, sampled: float) -> float:
        """How far, in keys of a first chunk of n, the rank of the threshold may lie from the
        estimate that `sampled` of its keys give: BAND_SIGMAS binomial deviations (the chunk's
        own against the tensor's, and the sample's against the chunk's) and BAND_MARGIN."""
        estimate = self.need * n / self.numel
        return BAND_SIGMAS * math.sqrt(estimate * max(0.0, 1 - estimate / n) * n / sampled) + BAND_MARGIN * n

    def _band_room_in(self, n: int) -> float:
        """A first chunk of n's share of half the band's cap."""
        return self.band_cap * n / (2 * self.numel)

    def _band_gather(self, fused, x: torch.Tensor, base: torch.Tensor | None, start: int) -> None:
        """This chunk's band keys, written by the kernel straight into the band's free room;
        then _check_band."""
        banded, above = fused.band_gather(x, base, self._band_shift(), *self.band, *self._band_free(), start)
        self._gathered(x.numel(), banded, above)

    def _band_free(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t[self.band_count :] for t in self._band_storage())  # type: ignore[return-value]

    def _gathered(self, n: int, banded: int, above: int) -> None:
        """A chunk of n elements seen by the band: `banded` keys gathered, `above` above it."""
        self.band_above += above
        self.band_seen += n
        self.band_count += banded
        self._check_band()

    @property
    def gathering(self) -> bool:
        """Whether this pass is the first pass's band alone, chosen (feed_group gathers it with others)."""
        return self.uncounted and self.band is not None

    def _check_band(self) -> None:
        """Drop the band, and with it the rest of the pass (`wants` says so: the pass is then
        repeated without one), once it cannot hold the threshold: more keys than the room
        the first chunk predicted, as many keys above it as are needed, or too few keys left
        to reach the need; or, from a quarter of the tensor on, where the rank `need` falls
        outside the keys gathered so far (deltas that vary along the tensor: the other three
        quarters would most likely be read in vain). A copy counts what it saw itself (the
        keys left: the whole tensor but its own)."""
        if self.band is None:
            return
        if (self.band_count > self.band_room or self.band_above >= self.need
                or self.band_above + self.band_count + self.numel - self.band_seen < self.need):
            self._band_off()
        elif 4 * self.band_seen >= self.numel:
            rank = self.need / self.numel
            if not self.band_above / self.band_seen < rank <= (self.band_above + self.band_count) / self.band_seen:
                self._band_off()

    def _band_add(self, keys: torch.Tensor, index: torch.Tensor) -> None:
        """Merging copies: their keys into this band's room."""
        m = keys.numel()
        if self.band_count + m > self.band_room:
            self._band_off()  # more keys than the first chunks predicted
            return
        band_key, band_index = self._band_storage()
        band_key[self.band_count : self.band_count + m].copy_(keys)
        band_index[self.band_count : self.band_count + m].copy_(index)
        self.band_count += m

    def _band_storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.band_key is None or self.band_index is None:  # allocated once, never grown
            if self.scratch is None:
                self.band_key = torch.empty(self.band_room, dtype=torch.int64)
                self.band_index = torch.empty(self.band_room, dtype=torch.int64)
            else:  # at the cap (the same for every tensor of a node): allocated once, touched up to the room
                room, cap = self.band_room, max(self.band_room, self.band_cap)
                self.band_key = self.scratch.buffer("band.key", torch.int64, cap, "cpu")[:room]
                self.band_index = self.scratch.buffer("band.index", torch.int64, cap, "cpu")[:room]
        return self.band_key, self.band_index

    def _zeroed(self, tag: str, dtype: torch.dtype, n: int, device: torch.device) -> torch.Tensor:
        if self.scratch is None:
            return torch.zeros(n, dtype=dtype, device=device)
        return self.scratch.buffer(tag, dtype, n, device).zero_()

    def _band_shift(self) -> int:
        """The shift that leaves a key's first digit, the band's digits."""
        return self._width() - self._digit_bits()

    def _clear_pass(self) -> None:
        """Forget this pass's counts, extremes and chunk records (the next pass starts afresh)."""
        self.hist = self.kmin = self.kmax = None
        self.chunks = []

    def _band_off(self) -> None:
        self.band_open, self.band, self.band_key, self.band_index = False, None, None, None
        self.band_count = self.band_room = self.band_above = self.band_seen = 0

    def _band_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.band_key is None or self.band_index is None:
            return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
        return self.band_key[: self.band_count], self.band_index[: self.band_count]

    def wants(self, start: int, n: int) -> bool:
        """Whether a pass needs elements [start, start + n) at all (a caller may skip the read)."""
        if self.done or (self.uncounted and self.band is None):  # a band that missed: this pass is repeated
            return False
        return self.window is None or (start < self.window[1] and self.window[0] < start + n)

    def skip_length(self, start: int) -> int | None:
        """The length of the chunk at `start` if it is one of the settling pass's chunks and
        this selection needs none of it (a caller may then skip the chunk without reading
        anything); None if it may need it or does not know the chunk."""
        if self.done or self.grid is None or start not in self.grid:
            return None
        n = self.grid[start]
        return None if self.wants(start, n) else n

    def _record_chunk(self, start: int, n: int, count: int, keys: torch.Tensor | None, *, final: bool) -> None:
        """Note how many keys of this chunk share the prefix (`count`; `keys`: those keys, when
        at hand) and, if this pass settles the key (its digit is the last), which distinct keys
        they are: few when inputs are float16 or bfloat16 (their deltas lie on a coarse grid),
        which is also when ties are many."""
        uniq = counts = None
        # Only a prefix-filtered few: a whole chunk's distinct keys would cost a sort of it.
        if final and self.chunk_keys and self.known and keys is not None and count <= n // 8:
            uniq, counts = torch.unique(keys, return_counts=True)
            uniq, counts = uniq.to("cpu", torch.int64), counts.cpu()
            if sum(c[3].numel() for c in self.chunks if c[3] is not None) + uniq.numel() > self.keys_cap:
                uniq = counts = None
        if uniq is None and self.chunk_keys and final:  # without this chunk's keys, none are of use
            self.chunk_keys = False
            self.chunks = [(a, b, m, None, None) for a, b, m, _, _ in self.chunks]
        self.chunks.append((start, n, count, uniq, counts))

    def _ties_per_chunk(self, key: int, single: bool) -> list[tuple[int, int, int]] | None:
        """(start, n, elements of the chunk equal to `key`) for every chunk of the settling pass,
        in element order, or None where the pass did not record them."""
        if single:  # every key sharing the prefix is `key`
            spans = [(a, b, m) for a, b, m, _, _ in self.chunks]
        elif self.chunk_keys and all(c[3] is not None for c in self.chunks):
            spans = [(a, b, int(cnt[uniq == key].sum())) for a, b, _, uniq, cnt in self.chunks]
        else:
            return None
        return sorted(spans)

    def _count_dtype(self) -> torch.dtype:
        return torch.int32 if self.numel < 1 << 31 else torch.int64

    def _see(self, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
        if lo is None or hi is None:
            return
        self.kmin = lo if self.kmin is None else torch.minimum(self.kmin, lo)
        self.kmax = hi if self.kmax is None else torch.maximum(self.kmax, hi)

    def _append(self, keys: torch.Tensor, index: torch.Tensor | None) -> None:
        self.cand_key = keys if self.cand_key is None else torch.cat([self.cand_key, keys])
        if index is not None:
            self.cand_index = index if self.cand_index is None else torch.cat([self.cand_index, index])
        if self.cand_key.numel() > COLLECT_CAP:
            raise ValueError("more candidates than the histogram counted: a chunk was observed twice")

    def merge(self, other: Selection) -> None:
        if self.done:
            return
        same = (self.stage, self.collect, self.prefix, self.known, self.need, self.passes, self.max_bits, self.window)
        if same != (other.stage, other.collect, other.prefix, other.known, other.need, other.passes, other.max_bits,
                    other.window):
            raise ValueError("cannot merge selections at different steps")
        if self.dtype is None:
            self.dtype = other.dtype
        elif other.dtype is not None and other.dtype != self.dtype:
            raise TypeError(f"cannot merge selections over {self.dtype} and {other.dtype}")
        # Mid-pass counts live where their chunks were: fold them onto this state's device.
        if other.hist is not None:
            self.hist = other.hist.clone() if self.hist is None else self.hist.add_(other.hist.to(self.hist.device))
        if other.kmin is not None and other.kmax is not None:
            device = other.kmin.device if self.kmin is None else self.kmin.device
            self._see(other.kmin.to(device), other.kmax.to(device))
        self.chunks.extend(other.chunks)
        recorded = sum(c[3].numel() for c in self.chunks if c[3] is not None)
        self.chunk_keys = self.chunk_keys and other.chunk_keys and recorded <= self.keys_cap
        if not self.chunk_keys:
            self.chunks = [(a, b, m, None, None) for a, b, m, _, _ in self.chunks]
        if other.cand_key is not None:
            self._append(other.cand_key, other.cand_index)
        self._merge_band(other)

    def _merge_band(self, other: Selection) -> None:
        """Bands chosen by two copies from different first chunks: the digits both gathered,
        the keys above the narrower top counted as above."""
        self.uncounted = self.uncounted or other.uncounted
        if other.band_open:
            return  # the other copy saw no chunk
        if self.band_open:
            self._band_off()
            self.band, self.band_room, self.band_above = other.band, other.band_room, other.band_above
            self.band_seen = other.band_seen
            if other.band is not None:
                self._band_add(*other._band_entries())
            return
        if self.band is None or other.band is None:
            self._band_off()
            return
        lo, hi = max(self.band[0], other.band[0]), min(self.band[1], other.band[1])
        mine, theirs = self._band_entries(), other._band_entries()
        keys, index = (torch.cat([mine[m], theirs[m]]) for m in (0, 1))
        digits = keys >> self._band_shift()
        above = self.band_above + other.band_above + int((digits > hi).sum())
        room = min(self.band_cap, self.band_room + other.band_room)
        seen = self.band_seen + other.band_seen
        self._band_off()
        if lo <= hi:
            inside = (digits >= lo) & (digits <= hi)
            self.band, self.band_room, self.band_above, self.band_seen = (lo, hi), room, above, seen
            self._band_add(keys[inside], index[inside])

    def end_pass(self) -> None:
        if self.done:
            return
        self.passes += 1
        if self.dtype is None:
            raise ValueError("a selection pass saw no element")
        if self.collect:
            self._end_collect()
        else:
            self._end_histogram()

    def _end_histogram(self) -> None:
        if self._settle_from_band():
            return
        if self.uncounted:  # a band that missed (and no histogram): this pass again, without one
            self.uncounted = False
            self._clear_pass()
            return
        width = self._width()
        digit_bits = self._digit_bits()
        if self.hist is None:
            raise ValueError("a selection pass saw no element")
        counts = self.hist.to("cpu", torch.int64)
        seen = None if self.kmin is None or self.kmax is None else (int(self.kmin), int(self.kmax))
        single = seen[0] if seen is not None and seen[0] == seen[1] else None
        chunks = self.chunks
        self._clear_pass()
        # The need-th largest lies in the highest digit where the count from the top reaches need.
        from_top = counts.flip(0).cumsum(0)
        rank = int(torch.searchsorted(from_top, self.need))
        if rank == len(counts):
            raise ValueError("fewer elements than the selection needs: a chunk was missed")
        digit = len(counts) - 1 - rank
        above = int(from_top[rank - 1]) if rank else 0
        self.need -= above
        remaining = int(counts[digit])
        whole = None  # the key, if every key in the digit is one and the same
        if self.known + digit_bits == width:
            whole = (self.prefix << digit_bits) | digit
        elif single is not None:
            whole = single
        if self.stage == "index":
            if whole is not None:  # the kept tie with the largest index, itself
                self._finish_cut(((1 << width) - 1) - whole + 1)
                return
        else:
            self.n_greater += above
            if whole is not None:
                self.chunks = chunks
                self._settle_threshold(whole, remaining, self._ties_per_chunk(whole, whole == single))
                return
        self.prefix = (self.prefix << digit_bits) | digit
        self.known += digit_bits
        self.collect = remaining <= COLLECT_CAP

    def _settle_from_band(self) -> bool:
        """At the end of a first pass with a band: if the need-th largest key lies in it (above <
        need <= above + gathered), ranking the gathered keys settles the selection as a collect
        pass would, ties included (no index pass). False if not; the band is dropped either way."""
        band, (keys, index), above = self.band, self._band_entries(), self.band_above
        self._band_off()
        if band is None or not above < self.need <= above + keys.numel():
            return False
        self.uncounted = False
        self._clear_pass()
        self.n_greater += above
        self.need -= above
        self.cand_key, self.cand_index = keys, index
        self._end_collect()
        return True

    def _end_collect(self) -> None:
        # numpy: its introselect and sort take 0.2 and ~0.1 ms on 200k candidates, torch's
        # kthvalue and sort (of indices mostly in order already) 2.2 and 2.9 ms (measured).
        keys = np.empty(0, dtype=np.int64) if self.cand_key is None else self.cand_key.numpy()
        if keys.size < self.need:
            raise ValueError("fewer candidates than the histogram counted: a chunk was missed")
        # The need-th largest key, the (size - need)-th smallest from 0.
        chosen = int(np.partition(keys, keys.size - self.need)[keys.size - self.need])
        if self.stage == "index":
            self._finish_cut(((1 << self._width()) - 1) - chosen + 1)
            return
        index = self.cand_index.numpy() if self.cand_index is not None else np.empty(0, dtype=np.int64)
        greater = int(np.count_nonzero(keys > chosen))
        tied = np.sort(index[keys == chosen])
        self.n_greater += greater
        self.need -= greater
        self.cand_key = self.cand_index = None
        self.threshold_bits = chosen
        self.n_equal = tied.size
        if chosen == 0 and self.inert_zeros:  # as _settle_threshold: every zero kept, whatever the pass
            self._finish(self.dtype, chosen, self.n_greater, self.n_equal, self.n_equal, self.numel)
            return
        cut = self.numel if self.need == self.n_equal else int(tied[self.need - 1]) + 1
        self._finish(self.dtype, chosen, self.n_greater, self.n_equal, self.need, cut)

    def _settle_threshold(self, threshold: int, n_equal: int, ties: list[tuple[int, int, int]] | None) -> None:
        self.chunks = []
        self.threshold_bits = threshold
        self.n_equal = n_equal
        self.keep_equal = self.need
        if self.need == n_equal or (threshold == 0 and self.inert_zeros):
            # Every tie is kept (with inert zeros: all zeros are, which changes no output value).
            self._finish(self.dtype, threshold, self.n_greater, n_equal, n_equal, self.numel)
            return
        # Only the first `need` tied elements in index order are kept: select their indices,
        # if the chunks' tie counts are known, among the ties of the chunk holding the cut only.
        self.stage = "index"
        self.prefix = self.known = 0
        in_window = n_equal
        if ties is not None and sum(t for _, _, t in ties) == n_equal:
            before = 0
            for start, n, tied in ties:
                if before + tied >= self.need:
                    self.window, self.need, in_window = (start, start + n), self.need - before, tied
                    self.grid = {a: b for a, b, _ in ties}
                    break
                before += tied
        self.collect = in_window <= COLLECT_CAP

    def _finish_cut(self, cut: int) -> None:
        self.cand_key = None
        self._finish(self.dtype, self.threshold_bits, self.n_greater, self.n_equal, self.keep_equal, cut)

    def _finish(
        self, dtype: torch.dtype | None, threshold_bits: int, n_greater: int, n_equal: int, keep_equal: int, cut: int
    ) -> None:
        self.hist = self.kmin = self.kmax = self.cand_key = self.cand_index = None
        self.chunks, self.grid = [], None
        self.result = TopKResult(
            numel=self.numel,
            k=self.k,
            dtype=dtype,
            threshold_bits=threshold_bits,
            threshold=None if dtype is None else _threshold_value(dtype, threshold_bits),
            n_greater=n_greater,
            n_equal=n_equal,
            n_equal_to_keep=keep_equal,
            cut_index=cut,
            passes=self.passes,
        )

    def mask(
        self, x: torch.Tensor, start: int, *, out: torch.Tensor | None = None, workspace: Workspace | None = None
    ) -> torch.Tensor:
        """Bool mask of the kept elements among [start, start + x.numel()) (into `out` if given)."""
        if self.result is None:
            raise RuntimeError("the selection needs more passes")
        return self.result.mask(x, start, out=out, workspace=workspace)

    def nbytes(self) -> int:
        held = [self.hist, self.cand_key, self.cand_index, self.band_key, self.band_index,
                *(t for c in self.chunks for t in c[3:])]
        return sum(t.numel() * t.element_size() for t in held if t is not None) + 48 * len(self.chunks)


def feed_group(fused, rows: list[tuple[Selection, int]], store: torch.Tensor, dtype: torch.dtype, slot: int,
               base: torch.Tensor, delta_dtype: torch.dtype, wide_base: torch.Tensor | None, start: int,
               workspace: Workspace | None = None) -> None:
    """`Selection.feed` of one chunk to the selections of several inputs at once, one per input:
    rows are (selection, the slot of its input's chunk as read in the uint8 `store`: `dtype`,
    `slot` bytes apart), their deltas against `base` as read, in `delta_dtype`. Selections
    that gather their band (`gathering`, or `band_open` and choosing one from this chunk)
    take one kernel call for all (_fused.band_gather_group): the base is widened once per
    tile, not copied to float32 and read again per input, and the per-input Python of `feed`
    is left out (it cost more than a small chunk's kernel). The others (no band fits, a
    histogram or tie-split pass) are fed one by one against `wide_base`, the same base in
    `delta_dtype`, which must be given where any such row or a `band_open` one is."""
    n, size = base.numel(), torch.empty(0, dtype=dtype).element_size()
    gathering: list[tuple[Selection, int]] = []
    for sel, k in rows:
        sel._take_dtype(delta_dtype)
        if not sel.gathering:  # as feed: a first chunk chooses the band, else (none fits) a histogram pass
            if wide_base is None:
                raise ValueError("feed_group: a selection that does not gather its band needs the widened base")
            x = store[k * slot : k * slot + n * size].view(dtype)
            if not (sel.band_open and sel._open_band(fused, x, wide_base)):
                sel.feed(x, start, workspace, base=wide_base)
                continue
        gathering.append((sel, k))
    if not gathering:
        return
    sels = [sel for sel, _ in gathering]
    free = [sel._band_free() for sel in sels]
    banded, above = fused.band_gather_group(store, [k for _, k in gathering], dtype, slot, base, delta_dtype,
                                            start, [(sel._band_shift(), *sel.band) for sel in sels],
                                            [k for k, _ in free], [i for _, i in free])
    for sel, b, a in zip(sels, banded.tolist(), above.tolist(), strict=True):
        sel._gathered(n, b, a)
