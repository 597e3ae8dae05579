"""The compiled kernels behind recipe/rng.py: Philox-4x32-10 blocks and DARE's fused delta.

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


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
def tile_words(stream, start, count, words):  # pragma: no cover (compiled)
    """The words of elements [start, start + count) of `stream`, as a view into `words` (which
    holds count + 2 * WORDS_PER_BLOCK at least): the blocks that cover them, from the first."""
    first = start // WORDS_PER_BLOCK
    last = (start + count - 1) // WORDS_PER_BLOCK
    fill(stream, first, last - first + 1, words)
    return words[start - WORDS_PER_BLOCK * first :]


@numba.njit(cache=True, nogil=True)
def drop_delta(x, base, out, accumulate, stream, start, threshold, divisor, divide):  # pragma: no cover (compiled)
    """Tile by tile, for element start + i: d = x[i] - base[i] (/ divisor when `divide`) where
    its word is below `threshold`, else +0.0 (NaN and inf too); out[i] = d, or out[i] += d
    with `accumulate`. The arithmetic is IEEE in out's dtype, as torch's sub, div and add."""
    n = out.shape[0]
    words = np.empty(TILE + 2 * WORDS_PER_BLOCK, np.uint32)
    zero = out.dtype.type(0)
    for s in range(0, n, TILE):
        e = min(s + TILE, n)
        # Slices, so that every index below is known non-negative and the loops vectorise;
        # the flags are tested outside the loops for the same reason.
        w = tile_words(stream, start + s, e - s, words)
        xs, bs, os = x[s:e], base[s:e], out[s:e]
        if accumulate and divide:
            for i in range(e - s):
                d = (xs[i] - bs[i]) / divisor
                os[i] += d if w[i] < threshold else zero
        elif accumulate:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] += d if w[i] < threshold else zero
        elif divide:
            for i in range(e - s):
                d = (xs[i] - bs[i]) / divisor
                os[i] = d if w[i] < threshold else zero
        else:
            for i in range(e - s):
                d = xs[i] - bs[i]
                os[i] = d if w[i] < threshold else zero
