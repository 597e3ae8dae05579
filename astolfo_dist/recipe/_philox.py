"""The compiled kernels behind recipe/rng.py: Philox-4x32-10 blocks and the random methods'
fused deltas (DARE's; DELLA's, wrapped by library/_fused.py).

Hand-written (numba) because no library has an element-addressable Philox-4x32 for the CPU:
numpy has only Philox-4x64 at its scalar speed, torch's generators are not addressable per
element. Imported on first use only (rng.py), since numba costs ~115 MiB of RSS. Compiled
code is cached on disk by numba (`cache=True`), so only the first run on a machine compiles;
`nogil=True` lets the local executor's worker threads run kernels at once (with the GIL held,
DARE with 2 workers used 1.3 of the 2 cores).
"""

from __future__ import annotations

import numba
import numpy as np

WORDS_PER_BLOCK = 4  # uint32 outputs of one Philox-4x32 block
TILE = 4096  # elements per tile of `drop_delta`: its words (16 KiB) stay in the L1 cache

# Philox-4x32 multipliers and Weyl key increments (Random123); numba freezes globals as constants.
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LOW32, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)
# Compiled once per machine and cached on disk (numba checks a kernel's cache against its own
# file only: a kernel calling `fill` must live in this file, or a change here would leave it
# stale); GIL released; IEEE arithmetic (x / 0 is inf or NaN, as in torch, not an exception).
KERNEL = dict(cache=True, nogil=True, error_model="numpy")


def flat(t) -> np.ndarray:
    """A contiguous torch tensor as the 1-D numpy view the kernels take."""
    return t.numpy() if t.dim() == 1 else t.view(-1).numpy()  # view(-1) alone costs 0.7 us a call


@numba.njit(**KERNEL)
def fill(stream, first_block, blocks, out):  # pragma: no cover (compiled)
    """out[4q : 4q + 4] = block first_block + q of `stream` (uint32 k0, k1, c2, c3): Philox-4x32-10
    with key (k0, k1) and counter (block mod 2**32, block // 2**32, c2, c3)."""
    k0, k1, c2, c3 = stream[0], stream[1], stream[2], stream[3]
    lo = np.uint64(first_block) & _LOW32
    hi = np.uint64(first_block) >> _S32
    for q in range(blocks):
        b = lo + np.uint64(q)  # the low counter word's carry goes into the next word
        x0, x1, x2, x3 = np.uint32(b & _LOW32), np.uint32(hi + (b >> _S32)), c2, c3
        a, bk = k0, k1
        for _ in range(10):
            p0, p1 = _M0 * np.uint64(x0), _M1 * np.uint64(x2)
            # The XORs are left to numba's integer promotion (their values stay below 2**32):
            # casting them back to uint32 here halves the speed (the loop no longer vectorises).
            x0, x1, x2, x3 = (np.uint32(p1 >> _S32) ^ x1 ^ a, np.uint32(p1),
                              np.uint32(p0 >> _S32) ^ x3 ^ bk, np.uint32(p0))
            a, bk = np.uint32(a + _W0), np.uint32(bk + _W1)
        out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3] = x0, x1, x2, x3


@numba.njit(**KERNEL)
def tile_words(stream, start, count, words):  # pragma: no cover (compiled)
    """The words of elements [start, start + count) of `stream`, as a view into `words` (which
    holds count + 2 * WORDS_PER_BLOCK at least): the blocks that cover them, from the first."""
    first = start // WORDS_PER_BLOCK
    last = (start + count - 1) // WORDS_PER_BLOCK
    fill(stream, first, last - first + 1, words)
    return words[start - WORDS_PER_BLOCK * first :]


@numba.njit(**KERNEL)
def drop_delta(x, base, out, accumulate, stream, start, threshold, divisor, divide):  # pragma: no cover (compiled)
    """Tile by tile, for element start + i: d = x[i] - base[i] where its word is below
    `threshold`, else +0.0 (NaN and inf too), then / divisor when `divide`; out[i] = d, or
    out[i] += d with `accumulate`. The arithmetic is IEEE in out's dtype, as torch's sub, div
    and add."""
    n = out.shape[0]
    words = np.empty(TILE + 2 * WORDS_PER_BLOCK, np.uint32)
    zero = out.dtype.type(0)
    for s in range(0, n, TILE):
        e = min(s + TILE, n)
        # Slices, so that every index below is known non-negative and the loops vectorise;
        # the flags are tested outside the loops for the same reason.
        w = tile_words(stream, start + s, e - s, words)
        xs, bs, os = x[s:e], base[s:e], out[s:e]
        # Drop, then divide, as torch (keep_only, then div_): a dropped 0 / divisor is +0, or
        # NaN for a divisor that is 0 in out's dtype.
        if accumulate and divide:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] += (d if w[i] < threshold else zero) / divisor
        elif accumulate:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] += d if w[i] < threshold else zero
        elif divide:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] = (d if w[i] < threshold else zero) / divisor
        else:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] = d if w[i] < threshold else zero


@numba.njit(**KERNEL)
def della_delta(x, base, out, accumulate, stream, start, thresholds, divisors, shift, rescale, buf, narrow,
                narrow_bits, divs, keep, words):  # pragma: no cover (compiled)
    """DELLA's delta, tile by tile (library/_fused.della_delta says what; the tiles are scratch)."""
    n = out.shape[0]
    zero = out.dtype.type(0)
    tile = buf.shape[0]
    for s in range(0, n, tile):
        e = min(s + tile, n)
        w = tile_words(stream, start + s, e - s, words)
        xs, bs, os = x[s:e], base[s:e], out[s:e]
        for i in range(e - s):
            d = xs[i] - bs[i]
            buf[i] = d
            narrow[i] = np.float32(d)
        # The lookups first (gathers), then the drop, the division and the sum in loops that
        # vectorise: with the division in the gather loop it took 5.5 ns per element.
        for i in range(e - s):
            b = (narrow_bits[i] & 0x7FFFFFFF) >> shift  # della.magnitude_bins: the pattern's top bits
            keep[i] = w[i] < thresholds[b]  # rng.bernoulli_mask's u < p, as rng.keep_threshold
            divs[i] = divisors[b]
        for i in range(e - s):
            buf[i] = buf[i] if keep[i] else zero  # keep_only: +0.0, NaN and inf too
        if rescale:  # then the division, as torch's div_ after keep_only
            for i in range(e - s):
                buf[i] = buf[i] / divs[i]
        for i in range(e - s):
            kept = buf[i]
            if accumulate:
                os[i] += kept
            else:
                os[i] = kept
