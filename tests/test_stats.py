"""Exact streaming top-k by magnitude against whole-tensor references (torch.topk, a stable sort)."""

from __future__ import annotations

import random

import pytest
import torch

from astolfo_dist.recipe.stats import TopKThreshold, exact_topk_mask, k_for_density, magnitude_bits

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _chunks(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.reshape(-1).split(size))


def _run(x: torch.Tensor, k: int, chunk: int, max_bits: int = 12):
    """Selection over chunks of `chunk` elements; returns (mask over flat x, result, factory calls)."""
    calls = []

    def factory():
        calls.append(1)
        return iter(_chunks(x, chunk))

    sel = exact_topk_mask(factory, x.numel(), k, max_bits=max_bits)
    flat = x.reshape(-1)
    parts, start = [], 0
    for c in flat.split(chunk):
        parts.append(sel(c, start))
        start += c.numel()
    mask = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return mask, sel.result, len(calls)


def _reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |x|, ties kept in element-index order, NaN largest: a stable sort in float64."""
    a = x.reshape(-1).double().abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, float("inf")), a)
    # NaN above inf: rank NaNs first, then a stable descending sort of the rest.
    order = torch.sort(-a, stable=True).indices
    nan_first = torch.cat([order[torch.isnan(x.reshape(-1)[order])], order[~torch.isnan(x.reshape(-1)[order])]])
    ref = torch.zeros(a.numel(), dtype=torch.bool)
    ref[nan_first[:k]] = True
    return ref


def _random_tensor(rnd: random.Random, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rnd.getrandbits(31))
    kind = rnd.choice(["normal", "duplicates", "zeros", "tiny"])
    if kind == "normal":
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * rnd.choice([1e-3, 1.0, 50.0])
    elif kind == "duplicates":  # few distinct magnitudes, both signs: heavy ties
        x = torch.randint(-4, 5, shape, generator=gen).double() * 0.25
    elif kind == "zeros":  # mostly zeros, like a task vector of untouched weights; -0.0 too
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        x[torch.rand(shape, generator=gen) < 0.7] = 0.0
        x[torch.rand(shape, generator=gen) < 0.1] = -0.0
    else:  # subnormals and near-zero values
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-6
    return x.to(dtype)


SHAPES = [(1,), (2,), (7,), (33, 17), (4, 5, 6), (1000,), (3001,), (64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_against_references(dtype: torch.dtype) -> None:
    rnd = random.Random(1000 + DTYPES.index(dtype))
    for shape in SHAPES:
        for _ in range(4):
            x = _random_tensor(rnd, shape, dtype)
            n = x.numel()
            for k in sorted({0, 1, n // 3, max(0, n - 1), n, rnd.randint(0, n)}):
                # One-element chunks only on small tensors: they cost a Python step per element.
                chunk = rnd.choice([1, 3, 64, 1000, n] if n <= 64 else [37, 64, 1000, n])
                mask, res, _ = _run(x, k, chunk)
                assert int(mask.sum()) == k, (shape, k, chunk)
                a = x.reshape(-1).double().abs()
                if 0 < k < n:
                    assert float(a[mask].min()) >= float(a[~mask].max())
                    assert res.threshold == float(a[mask].min())
                    assert res.n_greater + res.n_equal_to_keep == k
                    assert res.n_greater == int((a > res.threshold).sum())
                    assert res.n_equal == int((a == res.threshold).sum())
                # Ties in element-index order: exactly the stable-sort reference.
                assert torch.equal(mask, _reference_mask(x, k)), (shape, k, chunk)
                if 0 < k < n and res.n_equal_to_keep == res.n_equal:
                    # No split tie at the threshold: the set is the one torch.topk picks.
                    top = torch.topk(a, k).indices
                    assert set(top.tolist()) == set(torch.nonzero(mask).reshape(-1).tolist())


def test_topk_no_ties_large() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200_003, generator=gen)
    k = 61_234
    mask, res, calls = _run(x, k, 4096)
    top = torch.zeros_like(mask)
    top[torch.topk(x.abs(), k).indices] = True
    assert torch.equal(mask, top)
    assert res.passes == calls == 3  # float32: 11 + 10 + 10 bits, no tie pass
    assert res.n_equal == 1 and res.cut_index == x.numel()


def test_pass_counts_and_histogram_bound() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    for dtype, passes in [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 3), (torch.float64, 6)]:
        y = x.to(dtype) * 1.7
        sel = TopKThreshold(y.numel(), 2000)
        bins = []
        while not sel.done:
            for c in y.split(512):
                sel.feed(c)
                bins.append(sel.histogram_bins)
                if sel.pass_satisfied:
                    break
            sel.end_pass()
        assert max(bins) <= 2**12
        # The tie pass (fp16/bf16 repeat values often) adds at most one pass.
        assert sel.result.passes in (passes, passes + 1), dtype
        assert sel.result.passes == passes + (sel.result.n_equal_to_keep < sel.result.n_equal)


def test_narrow_histograms_still_exact() -> None:
    x = _random_tensor(random.Random(5), (777,), torch.float32)
    for max_bits in (1, 4, 7):
        mask, res, calls = _run(x, 300, 50, max_bits=max_bits)
        assert torch.equal(mask, _reference_mask(x, 300))
        assert calls == res.passes >= -(-31 // max_bits)


def test_ties_kept_in_index_order_and_tie_pass_stops_early() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, 2.0, -2.0, 3.0, 2.0, 1.0, 2.0])
    mask, res, calls = _run(x, 3, 2)
    # 3.0, then the first two of the six |2.0|s (indices 1 and 2).
    assert torch.nonzero(mask).reshape(-1).tolist() == [1, 2, 6]
    assert (res.threshold, res.n_greater, res.n_equal, res.n_equal_to_keep, res.cut_index) == (2.0, 1, 6, 2, 3)
    assert calls == 4  # 3 histogram passes + the tie pass
    # The tie pass reads only up to the cut: count chunks fed in it.
    fed = []
    sel = TopKThreshold(x.numel(), 3)
    while not sel.done:
        tie = sel.in_tie_pass
        for c in x.split(2):
            sel.feed(c)
            fed.append(tie)
            if sel.pass_satisfied:
                break
        sel.end_pass()
    assert fed.count(True) == 2  # chunks [0,2) and [2,4) hold the cut at index 3


def test_zeros_and_signed_zero_tie() -> None:
    x = torch.tensor([0.0, -0.0, 0.0, 1.0, -0.0, 0.0])
    mask, res, _ = _run(x, 3, 4)
    assert mask.tolist() == [True, True, False, True, False, False]
    assert res.threshold == 0.0 and res.n_equal == 5


def test_nan_and_inf_rank_first() -> None:
    x = torch.tensor([1.0, float("inf"), float("nan"), -float("inf"), 5.0, -float("nan"), 2.0])
    mask, res, _ = _run(x, 3, 3)
    assert torch.nonzero(mask).reshape(-1).tolist() == [1, 2, 5]  # both NaNs, then the first inf
    mask, _, _ = _run(x, 2, 3)
    assert torch.nonzero(mask).reshape(-1).tolist() == [2, 5]
    top = torch.topk(x.abs(), 2).indices.tolist()  # torch.topk ranks NaN first too
    assert sorted(top) == [2, 5]
    # NaNs with different payloads tie with each other (kept in index order), for every dtype.
    for dtype, int_dtype, nans in [
        (torch.float32, torch.int32, [0x7F800001, 0x7FC00000, 0x7FFFFFFF]),
        (torch.float16, torch.int16, [0x7C01, 0x7E00, 0x7FFF]),
        (torch.float64, torch.int64, [0x7FF0000000000001, 0x7FF8000000000000]),
    ]:
        y = torch.cat([torch.tensor([1.0, float("inf")], dtype=dtype), torch.tensor(nans, dtype=int_dtype).view(dtype)])
        mask, res, _ = _run(y, 1, 2)
        assert torch.nonzero(mask).reshape(-1).tolist() == [2], dtype
        assert res.n_equal == len(nans)


def test_mask_is_independent_of_chunking_at_apply_time() -> None:
    x = _random_tensor(random.Random(9), (4099,), torch.bfloat16)
    k = 1500
    _, res, _ = _run(x, k, 256)
    ref = _reference_mask(x, k)
    rnd = random.Random(2)
    for _ in range(10):
        cuts = sorted(rnd.sample(range(1, 4099), 8))
        bounds = [0, *cuts, 4099]
        pieces = list(zip(bounds, bounds[1:], strict=False))
        rnd.shuffle(pieces)  # any order: the mask is a pure function of (chunk, start)
        got = torch.zeros(4099, dtype=torch.bool)
        for a, b in pieces:
            got[a:b] = res.mask(x[a:b], a)
        assert torch.equal(got, ref)


def test_multidimensional_chunks_keep_their_shape() -> None:
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    sel = exact_topk_mask(lambda: iter(x.split(2)), x.numel(), 17)
    masks = [sel(c, 20 * i) for i, c in enumerate(x.split(2))]
    assert all(m.shape == (2, 10) for m in masks)
    assert torch.equal(torch.cat(masks).reshape(-1), _reference_mask(x, 17))


def test_float8_widened() -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    x = torch.randn(300, generator=torch.Generator().manual_seed(0)).to(torch.float8_e4m3fn)
    mask, res, _ = _run(x, 100, 64)
    assert res.dtype == torch.float32
    assert torch.equal(mask, _reference_mask(x.float(), 100))


def test_magnitude_bits_order_like_magnitudes() -> None:
    for dtype in DTYPES:
        v = torch.tensor([0.0, 1e-30, 1e-7, 0.5, 1.0, 1.5, 2.0, 1e4, 6e4, float("inf")], dtype=torch.float64)
        v = torch.unique(v.to(dtype))  # sorted, distinct after rounding
        bits = magnitude_bits(v)
        assert torch.all(bits[1:] > bits[:-1]), dtype
        assert torch.equal(magnitude_bits(-v), bits)


def test_errors() -> None:
    with pytest.raises(ValueError):
        TopKThreshold(10, 11)
    with pytest.raises(ValueError):
        TopKThreshold(10, -1)
    sel = TopKThreshold(10, 3)
    sel.feed(torch.randn(6))
    with pytest.raises(TypeError):
        sel.feed(torch.randn(4, dtype=torch.float64))
    with pytest.raises(TypeError):
        TopKThreshold(3, 1).feed(torch.arange(3))
    short = TopKThreshold(10, 3)
    short.feed(torch.randn(6))
    with pytest.raises(ValueError, match="expected numel"):
        short.end_pass()
    with pytest.raises(ValueError):
        TopKThreshold(4, 1).feed(torch.randn(5))
    with pytest.raises(RuntimeError):
        _ = TopKThreshold(4, 1).result


def test_k_for_density() -> None:
    assert k_for_density(10, 0.1) == 1  # the double 0.1 is slightly above 1/10
    assert k_for_density(10, 0.3) == 3
    assert k_for_density(10, 0.7) == 7
    assert k_for_density(7, 0.5) == 4
    assert k_for_density(1000, 0.0) == 0 and k_for_density(1000, 1.0) == 1000
    assert k_for_density(3, 1e-9) == 1
    with pytest.raises(ValueError):
        k_for_density(10, 1.5)
