"""Exact, order-free sums of float64 terms: the statistics behind SLERP, model_stock, Weiszfeld.

A float sum depends on the order of its additions, so chunk partials summed in float64 would
make a statistic (and every output bit after it) depend on the chunk size and on how a pass
was split between workers. Here every finite float64 term x = M * 2**(e-53) (|M| < 2**53) is
added exactly to a Python integer scaled by 2**1126 (the smallest subnormal is 2**-1074 =
2**52 * 2**-1126): a superaccumulator. Per chunk, the 53-bit mantissas are split into a
27-bit and a 26-bit half and summed per exponent with integer index_add (exact, any device,
any order), then the at most 2098 exponent bins are folded into the big integer. Partial sums
merge by integer addition; `value()` rounds once, correctly (Python's int / int division is
correctly rounded). Non-finite terms are summed apart (their sum is order-free: nan wins,
+inf and -inf give nan).

The terms themselves (products, squares) are rounded elementwise by the caller, once per
element, so they do not depend on chunking either. Products of float32 values are exact in
float64, so with float32 (or narrower) sources dot products and norms are exactly rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..workspace import Workspace

_SHIFT = 1126  # value * 2**_SHIFT is an integer for every finite float64
_BINS = 2098  # frexp exponents -1073..1024, shifted to 0..2097
_SPLIT = 26
_LOW = (1 << _SPLIT) - 1


@dataclass
class ExactSum:
    total: int = 0  # exact sum of the finite terms, times 2**_SHIFT
    special: float = 0.0  # sum of the non-finite terms (0.0: none)

    def add(self, x: torch.Tensor, workspace: Workspace | None = None) -> None:
        """Add every element of `x` (converted to float64, which is exact for narrower floats).

        With `workspace`, the chunk-sized temporaries come from it (tags "exact.*")."""
        x = x.reshape(-1)
        if x.dtype != torch.float64:
            x = x.to(torch.float64) if workspace is None else workspace.like("exact.x", x, torch.float64).copy_(x)
        n = x.numel()
        if n == 0:
            return

        def scratch(tag: str, like: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            return torch.empty_like(like, dtype=dtype) if workspace is None else workspace.like(tag, like, dtype)

        q = scratch("exact.q", x)
        # A finite float sum means finite terms (a NaN or inf term makes it NaN or inf): the
        # elementwise check runs only when it is not (then the sum may also have overflowed).
        if not math.isfinite(float(x.sum())):
            finite = torch.lt(torch.abs(x, out=q), math.inf, out=scratch("exact.ok", x, torch.bool))  # NaN: False
            if not bool(finite.all()):
                self._add_special(x[~finite])
                x = x[finite]
                n = x.numel()
        # Error-free extraction (Rump, Ogita, Oishi: "Accurate floating-point summation", 2008):
        # with sigma = 2**j >= 2n * max|r|, q = (sigma + r) - sigma is r rounded to the grid
        # 2**(j-53), r - q is exact, and any float sum of the q's is exact (every partial sum is
        # a multiple of the grid below 2**j). Each level peels 53 - log2(2n) bits off the top.
        lg = n.bit_length() + 1
        r: torch.Tensor | None = None
        q = q[:n]  # fewer elements if non-finite ones were set apart
        total = self.total
        while True:
            src = x if r is None else r
            lo, hi = torch.aminmax(src) if n else (torch.zeros(()), torch.zeros(()))
            amax = max(float(hi), -float(lo))
            if amax == 0.0:
                break
            j = math.frexp(amax)[1] + lg  # amax < 2**(j - lg)
            if j > 1023 or j - 53 < -1074:
                total += self._bins(src)  # huge or subnormal-grid terms: exact per-exponent bins
                break
            sigma = math.ldexp(1.0, j)
            torch.add(src, sigma, out=q).sub_(sigma)
            if r is None:
                r = torch.sub(x, q, out=scratch("exact.r", x))
            else:
                r.sub_(q)
            s = float(q.sum())  # exact
            total += int(math.ldexp(s, 53 - j)) << (j - 53 + _SHIFT)
        self.total = total

    @staticmethod
    def _bins(x: torch.Tensor) -> int:
        """Exact sum of finite float64 terms, times 2**_SHIFT, by integer sums per exponent."""
        m, e = torch.frexp(x)
        mant = (m * 2.0**53).to(torch.int64)  # exact: a power-of-two scaling of |m| < 1
        shift = e.to(torch.int64).add_(1073)
        hi = torch.zeros(_BINS, dtype=torch.int64, device=x.device)
        lo = torch.zeros(_BINS, dtype=torch.int64, device=x.device)
        hi.index_add_(0, shift, mant >> _SPLIT)  # |sum| <= n * 2**27: fine below 2**36 elements
        lo.index_add_(0, shift, mant & _LOW)
        used = torch.nonzero((hi != 0) | (lo != 0)).reshape(-1)
        total = 0
        for s, h, low in zip(used.tolist(), hi[used].tolist(), lo[used].tolist(), strict=True):
            total += ((h << _SPLIT) + low) << s
        return total

    def _add_special(self, bad: torch.Tensor) -> None:
        vals = set(bad.tolist())
        if self.special != 0.0:
            vals.add(self.special)
        if any(math.isnan(v) for v in vals) or (math.inf in vals and -math.inf in vals):
            self.special = math.nan
        else:
            self.special = math.inf if math.inf in vals else -math.inf

    def merge(self, other: ExactSum) -> None:
        self.total += other.total
        if other.special != 0.0:
            special = math.nan if math.isnan(other.special) else other.special
            if self.special == 0.0:
                self.special = special
            elif math.isnan(self.special) or math.isnan(special) or self.special != special:
                self.special = math.nan

    def value(self) -> float:
        """The sum, rounded once to the nearest float64."""
        if self.special != 0.0:
            return self.special
        try:
            return self.total / (1 << _SHIFT)
        except OverflowError:
            return math.inf if self.total > 0 else -math.inf


def exact_dot(a: torch.Tensor, b: torch.Tensor, acc: ExactSum, workspace: Workspace | None = None) -> None:
    """acc += sum(a * b), each product rounded once in float64 (exact for float32 inputs).

    With `workspace`, the chunk-sized temporaries come from it (tags "exact.*")."""

    def widen(t: torch.Tensor, tag: str) -> torch.Tensor:
        if t.dtype == torch.float64:
            return t
        return t.to(torch.float64) if workspace is None else workspace.like(tag, t, torch.float64).copy_(t)

    a64 = widen(a, "exact.a")
    b64 = a64 if b is a else widen(b, "exact.b")
    if workspace is None:
        acc.add(a64 * b64)
    else:
        acc.add(torch.mul(a64, b64, out=workspace.like("exact.prod", a64)), workspace)
