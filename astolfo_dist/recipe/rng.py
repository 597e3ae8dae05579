"""Counter-based random numbers for random merge methods (DARE, DELLA masks).

Element e of a tensor gets a value that depends only on (seed, input_index, key, e), so a
mask is the same however the tensor is chunked, sharded or scheduled, and on any device.
The generator is Philox-4x64-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011) as implemented in C by numpy (`numpy.random.Philox`), used as a pure
function of (key, counter); the tests check it against the Random123 known-answer vectors
and against a plain-Python Philox written from the paper.

Stream layout (version 2; changing any of it changes every random merge, so don't):

* blake2b (40-byte digest, personalisation b"astolfo-rng-v2") of the domain string
  b"astolfo-dist/rng/philox4x64-10/v2" followed by, for each of str(seed), str(input_index)
  (ASCII decimal) and key (UTF-8, lone surrogates passed through), its byte length as 8
  little-endian bytes and then its bytes. The digest is read as five little-endian uint64
  words (k0, k1, c1, c2, c3).
* Block b is Philox-4x64-10 with key (k0, k1) and counter words (b, c1, c2, c3) (word 0 the
  low one, as in Random123), giving four uint64 words x0..x3.
* Element e is 32 bits of block b = e // 8: with j, h = divmod(e % 8, 2), it is
  (x_j >> 32 * h) & 0xFFFFFFFF. That is, the uint64 words of blocks 0, 1, 2... in order,
  read as little-endian uint32 pairs (low half first).
* uniform01 is u32 * 2**-32 (exact in float64, in [0, 1)). A mask with keep probability p
  keeps element e iff u32 * 2**-32 < p. 32 bits, not 53: a probability is then resolved to
  2**-32, far below what a mask rate needs, and the scalar case is one uint32 compare.

Elements are limited to e < 2**62, so b < 2**59 always fits counter word 0.

numpy's Philox returns the block of counter c + 1 first (a 256-bit increment: word 0 is the
low 64 bits of the integer counter), so a generator for block b is built with counter
(b, c1, c2, c3) - 1 as a 256-bit integer. (numpy has only the 4x64 variant. Version 1 of
this layout was Philox-4x32-10 in torch int64 arithmetic, 20-30x slower per mask.)

Masks are generated on the host (numpy) and copied to the requested device; for a CUDA
device that costs a host-to-device copy of one bool per element (and, for per-element
probabilities, a device-to-host copy of them).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

MAX_ELEMENTS = 2**62  # element indices are < this (recipe/library/_select.py relies on it)
_DOMAIN = b"astolfo-dist/rng/philox4x64-10/v2"
_PERSON = b"astolfo-rng-v2"
_WORDS_PER_BLOCK = 8  # uint32 outputs of one Philox-4x64 block
_COMPARE_BLOCK = 1 << 16  # elements per float64 scratch block in _below: bounded, cache-sized


def stream_key(seed: int, input_index: int, key: str) -> tuple[int, int, int, int, int]:
    """(k0, k1, c1, c2, c3): the Philox key and the upper counter words of (seed, input_index, key)."""
    h = hashlib.blake2b(digest_size=40, person=_PERSON)
    h.update(_DOMAIN)
    for part in (str(int(seed)).encode(), str(int(input_index)).encode(), key.encode("utf-8", "surrogatepass")):
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    d = h.digest()
    return tuple(int.from_bytes(d[i : i + 8], "little") for i in range(0, 40, 8))  # type: ignore[return-value]


def random_u32(seed: int, input_index: int, key: str, start: int, count: int) -> np.ndarray:
    """The stream's uint32 words for elements [start, start + count), on the host.

    Word start+i depends only on (seed, input_index, key, start+i).
    """
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got {start}, {count}")
    if start + count > MAX_ELEMENTS:
        raise ValueError("element index out of the generator's range")
    if count == 0:
        return np.empty(0, dtype=np.uint32)
    k0, k1, c1, c2, c3 = stream_key(seed, input_index, key)
    first = start // _WORDS_PER_BLOCK
    blocks = (start + count - 1) // _WORDS_PER_BLOCK - first + 1
    counter = first | c1 << 64 | c2 << 128 | c3 << 192
    # numpy increments the counter before each block: start one below block `first`.
    gen = np.random.Philox(key=k0 | k1 << 64, counter=(counter - 1) % 2**256)
    words = gen.random_raw(4 * blocks).astype("<u8", copy=False).view("<u4")
    offset = start - _WORDS_PER_BLOCK * first
    return words[offset : offset + count]


def _unit(words: np.ndarray) -> np.ndarray:
    """u32 * 2**-32 as float64: exact, in [0, 1)."""
    u = words.astype(np.float64)
    u *= 2.0**-32
    return u


def uniform01(
    seed: int,
    input_index: int,
    key: str,
    start: int,
    count: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """float64 values k / 2**32 in [0, 1) for elements [start, start + count).

    The value of element start+i depends only on (seed, input_index, key, start+i).
    """
    u = torch.from_numpy(_unit(random_u32(seed, input_index, key, start, count)))
    return u if device is None else u.to(device)


def _below(words: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """words * 2**-32 < probs elementwise, through a small float64 scratch buffer.

    Blockwise instead of one float64 array of the whole range: half the time, and the
    temporaries stay small.
    """
    n = words.shape[0]
    keep = np.empty(n, dtype=np.bool_)
    scratch = np.empty(min(n, _COMPARE_BLOCK), dtype=np.float64)
    for s in range(0, n, _COMPARE_BLOCK):
        e = min(s + _COMPARE_BLOCK, n)
        u = scratch[: e - s]
        np.multiply(words[s:e], 2.0**-32, out=u)
        np.less(u, probs[s:e], out=keep[s:e])
    return keep


def keep_threshold(p: float) -> int:
    """T with (u32 < T) == (u32 * 2**-32 < p) for every uint32 u32; 0 <= T <= 2**32.

    p * 2**32 is exact in float64 (a power-of-two scale) and u32 is an integer, so
    u32 < p * 2**32 iff u32 < ceil(p * 2**32).
    """
    x = float(p) * 2.0**32
    if not x > 0.0:  # p <= 0 or NaN: u < p never holds
        return 0
    if x >= 2.0**32:  # also inf
        return 2**32
    return math.ceil(x)


def bernoulli_mask(
    seed: int,
    input_index: int,
    key: str,
    start: int,
    count: int,
    p: float | torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """True with probability p for elements [start, start + count): u < p, u = uniform01.

    `p` may be a tensor of per-element probabilities (DELLA) of `count` elements, compared
    in float64. The mask is a bool tensor on `device`, generated on the host (see above).
    """
    words = random_u32(seed, input_index, key, start, count)
    if isinstance(p, torch.Tensor):
        probs = p.detach().to(device="cpu", dtype=torch.float64).reshape(-1).numpy()
        if probs.shape != (count,):
            raise ValueError(f"expected {count} probabilities, got {probs.shape[0]}")
        keep = _below(words, probs)
    else:
        t = keep_threshold(p)
        if t == 0:
            keep = np.zeros(count, dtype=np.bool_)
        elif t == 2**32:
            keep = np.ones(count, dtype=np.bool_)
        else:
            keep = words < np.uint32(t)
    mask = torch.from_numpy(keep)
    return mask if device is None else mask.to(device)
