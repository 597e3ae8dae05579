"""Counter-based random numbers for random merge methods (DARE, DELLA masks).

Element i of a tensor gets a value that depends only on (seed, input_index, key, i), so a
mask is the same however the tensor is chunked, sharded or scheduled, and on any device.
The generator is Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as
1, 2, 3", SC 2011), checked against the Random123 known-answer vectors in the tests.

Stream layout (version 1; changing any of it changes every random merge, so don't):

* blake2b-128 of a length-prefixed encoding of (seed, input_index, key) gives four 32-bit
  words: the first two are the Philox key, the last two the upper counter words.
* element i uses counter i // 4 in the lower two counter words and takes output word i % 4:
  32 random bits, scaled exactly into a float64 k / 2**32 in [0, 1). (32 bits, not 53: it
  halves the work, and a probability is then resolved to 2**-32, far below what a mask
  rate needs.)

The arithmetic is integer-only on int64 tensors, and no product ever exceeds 2**48: torch
has no shifts for uint64 and signed overflow is not something to rely on, so each 32x32-bit
multiply is done in two 32x16-bit halves.
"""

from __future__ import annotations

import hashlib

import torch

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9  # key schedule constants (golden ratio, sqrt(3) - 1)
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_ROUNDS = 10
_DOMAIN = b"astolfo-dist/rng/philox4x32-10/v1"


def stream_key(seed: int, input_index: int, key: str) -> tuple[int, int, int, int]:
    """Four 32-bit words naming the stream of (seed, input_index, key): Philox key + counter high."""
    h = hashlib.blake2b(digest_size=16, person=b"astolfo-rng-v1")
    h.update(_DOMAIN)
    for part in (str(int(seed)).encode(), str(int(input_index)).encode(), key.encode("utf-8", "surrogatepass")):
        # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    d = h.digest()
    return tuple(int.from_bytes(d[i : i + 4], "little") for i in range(0, 16, 4))  # type: ignore[return-value]


def _mulhilo_(m: int, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tmp: torch.Tensor) -> None:
    """lo, hi <- the 32-bit halves of m * x, for a 32-bit constant m and 32-bit values x (int64).

    Writes into preallocated buffers: allocation, not arithmetic, dominates at 1M elements.
    """
    torch.mul(x, m & _MASK16, out=lo)  # < 2**48
    torch.mul(x, m >> 16, out=hi)  # < 2**48
    torch.bitwise_and(hi, _MASK16, out=tmp)
    tmp.bitwise_left_shift_(16)
    lo.add_(tmp)  # t = x*m_lo + (x*m_hi mod 2**16) * 2**16 < 2**49; m*x = t + (x*m_hi >> 16) * 2**32
    torch.bitwise_right_shift(lo, 32, out=tmp)
    hi.bitwise_right_shift_(16)
    hi.add_(tmp)
    lo.bitwise_and_(_MASK32)


def philox4x32(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 of counters given as four int64 tensors of 32-bit words (same shape)."""
    c0, c1, c2, c3 = (c.clone() for c in counter)  # the rounds recycle these buffers
    lo0, hi0, lo1, hi1, tmp = (torch.empty_like(c0) for _ in range(5))
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        _mulhilo_(_M0, c0, lo0, hi0, tmp)
        _mulhilo_(_M1, c2, lo1, hi1, tmp)
        hi1.bitwise_xor_(c1).bitwise_xor_(k0)
        hi0.bitwise_xor_(c3).bitwise_xor_(k1)
        # (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the old words become scratch.
        c0, c1, c2, c3, lo0, hi0, lo1, hi1 = hi1, lo1, hi0, lo0, c0, c1, c2, c3
    return c0, c1, c2, c3


def uniform01(
    seed: int,
    input_index: int,
    key: str,
    start: int,
    count: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """float64 values in [0, 1) (32 random bits each) for elements [start, start + count).

    The value of element start+i depends only on (seed, input_index, key, start+i).
    """
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got {start}, {count}")
    if start + count > 2**62:
        raise ValueError("element index out of the generator's range")
    if count == 0:
        return torch.empty(0, dtype=torch.float64, device=device)
    w0, w1, w2, w3 = stream_key(seed, input_index, key)
    first, last = start // 4, (start + count - 1) // 4
    n = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    # Counter words: n's low and high 32 bits, then the stream's two words.
    counter = (n & _MASK32, n >> 32, torch.full_like(n, w2), torch.full_like(n, w3))
    words = torch.stack(philox4x32(counter, (w0, w1)), dim=1).reshape(-1)
    offset = start - 4 * first
    return words[offset : offset + count].to(torch.float64) * (2.0**-32)


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
    """True with probability p for elements [start, start + count): u < p.

    `p` may be a tensor of per-element probabilities (DELLA) of length `count`.
    """
    u = uniform01(seed, input_index, key, start, count, device=device)
    if isinstance(p, torch.Tensor):
        p = p.to(device=u.device, dtype=torch.float64).reshape(-1)
    return u < p
