"""Counter-based random numbers for random merge methods (DARE, DELLA masks).

Element e of a tensor gets a value that depends only on (seed, input_index, key, e), so a
mask is the same however the tensor is chunked, sharded or scheduled, and on any device.
The generator is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011), the variant cuRAND and JAX use, as a pure function of (key, counter);
the tests check it against the Random123 known-answer vectors and against a plain-Python
Philox written from the paper.

Stream layout (version 3; changing any of it changes every random merge, so don't):

* blake2b (16-byte digest, personalisation b"astolfo-rng-v3") of the domain string
  b"astolfo-dist/rng/philox4x32-10/v3" followed by, for each of str(seed), str(input_index)
  (ASCII decimal) and key (UTF-8, lone surrogates passed through), its byte length as 8
  little-endian bytes and then its bytes. The digest is read as four little-endian uint32
  words (k0, k1, c2, c3).
* Block b is Philox-4x32-10 with key (k0, k1) and counter words (b mod 2**32, b // 2**32,
  c2, c3) (word 0 first, as in Random123), giving four uint32 words x0..x3.
* Element e is word e % 4 of block e // 4.
* uniform01 is u32 * 2**-32 (exact in float64, in [0, 1)). A mask with keep probability p
  keeps element e iff u32 * 2**-32 < p: a probability is resolved to 2**-32, far below what
  a mask rate needs, and the scalar case is one uint32 compare.

Elements are limited to e < 2**62, so b < 2**60 fits the two low counter words.

The kernels are hand-written (recipe/library/_fused.py, compiled by numba) because numpy has only
Philox-4x64 (at its scalar speed, 1.6-2.2 ns per 32-bit word on the 2-core VM of the README's
benchmarks) and torch's generators are not addressable per element. Philox-4x32 needs only
32x32->64 multiplies, which vectorise: 0.4-0.8 ns per word here. A scalar-probability mask is
drawn, compared and applied in one pass over cache-sized tiles (`drop_delta_`, with the
subtraction of the base and the sum), instead of a uint32 array, a bool array, an integer mask
and five more passes over the chunk. (Version 2 of this layout
was numpy's Philox-4x64-10; version 1 Philox-4x32-10 in torch int64 operations.)

Words are generated on the host; for a CUDA tensor, a mask costs a host-to-device copy of
one bool per element (and, for per-element probabilities, a device-to-host copy of them).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

MAX_ELEMENTS = 2**62  # element indices are < this (recipe/library/_select.py relies on it)
_DOMAIN = b"astolfo-dist/rng/philox4x32-10/v3"
_PERSON = b"astolfo-rng-v3"
_COMPARE_BLOCK = 1 << 16  # elements per float64 scratch block in _below: bounded, cache-sized


def stream_key(seed: int, input_index: int, key: str) -> tuple[int, int, int, int]:
    """(k0, k1, c2, c3): the Philox key and the upper counter words of (seed, input_index, key)."""
    h = hashlib.blake2b(digest_size=16, person=_PERSON)
    h.update(_DOMAIN)
    for part in (str(int(seed)).encode(), str(int(input_index)).encode(), key.encode("utf-8", "surrogatepass")):
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    d = h.digest()
    return tuple(int.from_bytes(d[i : i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


def stream(seed: int, input_index: int, key: str) -> np.ndarray:
    """stream_key as a uint32 array: what the Philox kernels (recipe/library/_fused.py) take."""
    return np.array(stream_key(seed, input_index, key), dtype=np.uint32)


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got {start}, {count}")
    if start + count > MAX_ELEMENTS:
        raise ValueError("element index out of the generator's range")


def random_u32(seed: int, input_index: int, key: str, start: int, count: int) -> np.ndarray:
    """The stream's uint32 words for elements [start, start + count), on the host.

    Word start+i depends only on (seed, input_index, key, start+i).
    """
    _check_range(start, count)
    if count == 0:
        return np.empty(0, dtype=np.uint32)
    from .library._fused import WORDS_PER_BLOCK, fill  # here: numba loads only where masks are drawn

    first = start // WORDS_PER_BLOCK
    blocks = (start + count - 1) // WORDS_PER_BLOCK - first + 1
    words = np.empty(WORDS_PER_BLOCK * blocks, dtype=np.uint32)
    fill(stream(seed, input_index, key), first, blocks, words)
    offset = start - WORDS_PER_BLOCK * first
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


def keep_thresholds(probs: np.ndarray) -> np.ndarray:
    """T (uint64) per probability, with (u32 < T) == (u32 * 2**-32 < p) for every uint32 u32;
    0 <= T <= 2**32 (0 for p <= 0 or NaN, 2**32 for p >= 1).

    p * 2**32 is exact in float64 (a power-of-two scale) and u32 is an integer, so
    u32 < p * 2**32 iff u32 < ceil(p * 2**32).
    """
    scaled = np.clip(np.asarray(probs, dtype=np.float64) * 2.0**32, 0.0, 2.0**32)
    return np.nan_to_num(np.ceil(scaled), nan=0.0).astype(np.uint64)


def keep_threshold(p: float) -> int:
    """keep_thresholds of one probability, in Python floats: 0.5 us against 8 for the array
    form, and it runs once per chunk (tests/test_rng.py checks the two agree)."""
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


def kernel_takes(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels take these tensors: contiguous, on the CPU, of one dtype,
    float32 or float64 (they see them as numpy arrays)."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def drop_delta_(
    out: torch.Tensor,
    x: torch.Tensor,
    base: torch.Tensor,
    seed: int,
    input_index: int,
    key: str,
    start: int,
    p: float,
    divisor: float | None = None,
    *,
    accumulate: bool = False,
) -> torch.Tensor:
    """out = d, or out += d with `accumulate`, for elements [start, start + out.numel()), where
    d is x - base where u < p, else +0.0 (NaN and inf too), then divided by `divisor` if one is
    given. out and base: tensors the kernels take (`kernel_takes`); x too, or an input chunk
    as read in a dtype that widens to base's exactly (library/_fused.takes_source: float16 or
    bfloat16 for float32), read as it is.

    Bit for bit torch.sub, keep_only(bernoulli_mask(..., p)), div_ and add_, in one pass
    (DARE's delta on the CPU), NaN payloads aside (where x and base are both NaN, torch.sub
    keeps base's payload and this x's; see library/_fused.py).
    """
    from .library._fused import drop_delta, flat, source_array, takes_source

    tensors = (out, x, base)
    if not (kernel_takes(out, base) and takes_source(x, base)):
        raise ValueError("drop_delta_ needs contiguous CPU tensors of one dtype, float32 or float64 (x may be "
                         "an input as read that widens to it), got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
    if not x.numel() == base.numel() == out.numel():
        raise ValueError(f"drop_delta_: sizes differ: {out.numel()}, {x.numel()}, {base.numel()}")
    _check_range(start, out.numel())
    if out.numel():
        scalar = flat(out).dtype.type
        drop_delta(source_array(x), flat(base), flat(out), accumulate, stream(seed, input_index, key), start,
                   np.uint64(keep_threshold(p)), scalar(1.0 if divisor is None else divisor), divisor is not None)
    return out
