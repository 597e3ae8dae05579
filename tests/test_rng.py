"""The counter-based generator: Philox known answers, the stream layout against a plain-Python
reference, chunk independence, distinct streams, uniformity, exact thresholds and Bernoulli rates."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astolfo_dist.recipe.library._fused import fill
from astolfo_dist.recipe.rng import (
    MAX_ELEMENTS,
    bernoulli_mask,
    drop_delta_,
    keep_threshold,
    keep_thresholds,
    random_u32,
    stream_key,
    uniform01,
)

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
U32 = 2**32 - 1

# Random123's known-answer vectors for philox4x32-10: (counter, key, output).
PHILOX4X32_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32,) * 4, (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]  # fmt: skip


def philox4x32_py(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x32-10 on Python integers, written from the paper: the reference for the layout."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32
    return c0, c1, c2, c3


def reference_u32(seed: int, input_index: int, key: str, start: int, count: int) -> list[int]:
    """The module docstring's stream definition, element by element."""
    k0, k1, c2, c3 = stream_key(seed, input_index, key)
    out = []
    for e in range(start, start + count):
        b = e // 4
        out.append(philox4x32_py((b & U32, b >> 32, c2, c3), (k0, k1))[e % 4])
    return out


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X32_KATS)
def test_python_reference_known_answers(counter, key, expected) -> None:
    assert philox4x32_py(counter, key) == expected


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X32_KATS)
def test_kernel_known_answers(counter, key, expected) -> None:
    # Block b of a stream is counter (b mod 2**32, b // 2**32, c2, c3): a KAT's counter is a block.
    c0, c1, c2, c3 = counter
    out = np.empty(4, dtype=np.uint32)
    fill(np.array([*key, c2, c3], dtype=np.uint32), np.uint64(c0 | c1 << 32), 1, out)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize(
    ("start", "count"),
    [(0, 20), (5, 3), (7, 2), (8, 8), (13, 29), (2**32 - 6, 12), (2**34 - 7, 14), (2**35 * 8 - 3, 7),
     (MAX_ELEMENTS - 11, 11)],
)
def test_stream_matches_its_definition(start: int, count: int) -> None:
    got = random_u32(77, 3, KEY, start, count)
    assert got.dtype == np.uint32
    assert got.tolist() == reference_u32(77, 3, KEY, start, count)


def test_golden_stream() -> None:
    # Pins the stream layout (version 3: key derivation, counter use, word order): masks of
    # earlier merges must stay reproducible.
    assert stream_key(1, 0, "a") == (104007452, 3042358488, 1756729578, 246309257)
    words = random_u32(1234, 2, "model.diffusion_model.out.0.weight", 0, 10)
    assert words.tolist() == [
        1907860625, 640367697, 823294040, 1256769604, 141858460,
        2077848069, 3976012567, 192152651, 2534907849, 1744255300,
    ]  # fmt: skip
    assert random_u32(0, 0, "k", 2**40 + 3, 3).tolist() == [2915250658, 2642629588, 2990152786]
    assert random_u32(0, 0, "k", MAX_ELEMENTS - 3, 3).tolist() == [2867643777, 2358616258, 310381364]
    u = uniform01(1234, 2, "model.diffusion_model.out.0.weight", 3, 2)
    assert u.tolist() == [1256769604 * 2.0**-32, 141858460 * 2.0**-32]


def test_values_are_exact_32_bit_fractions_in_unit_interval() -> None:
    u = uniform01(3, 1, KEY, 17, 100_003)
    assert u.dtype == torch.float64 and u.shape == (100_003,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    scaled = u * 2.0**32
    assert torch.equal(scaled, scaled.floor())
    assert torch.equal(scaled.to(torch.int64), torch.from_numpy(random_u32(3, 1, KEY, 17, 100_003).astype(np.int64)))


@settings(max_examples=150, deadline=None, database=None)
@given(
    base=st.one_of(st.integers(0, 40), st.integers(0, MAX_ELEMENTS - 4096)),
    n=st.integers(1, 3000),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=12),
)
def test_chunk_independence_any_split(base: int, n: int, cuts: list[float]) -> None:
    """Any split of [base, base + n) into chunks gives the same concatenated stream."""
    whole = random_u32(42, 3, KEY, base, n)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    parts = [random_u32(42, 3, KEY, base + a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_chunk_independence_single_elements() -> None:
    whole = uniform01(42, 3, KEY, 0, 10_007)
    for i in (0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 997, 10_006):
        assert torch.equal(uniform01(42, 3, KEY, i, 1), whole[i : i + 1])
    assert torch.equal(torch.cat([uniform01(42, 3, KEY, 0, 300), uniform01(42, 3, KEY, 300, 700)]), whole[:1000])


def test_determinism_across_calls() -> None:
    a = uniform01(5, 0, KEY, 1000, 50_000)
    b = uniform01(5, 0, KEY, 1000, 50_000)
    assert torch.equal(a, b)
    assert torch.equal(bernoulli_mask(5, 0, KEY, 1000, 50_000, 0.3), bernoulli_mask(5, 0, KEY, 1000, 50_000, 0.3))


@pytest.mark.parametrize(
    "other",
    [(6, 0, KEY), (5, 1, KEY), (5, 0, KEY + "x"), (5, 0, KEY.replace("weight", "bias")), (-5, 0, KEY), (0, 5, KEY)],
)
def test_streams_differ(other: tuple[int, int, str]) -> None:
    n = 100_000
    base = uniform01(5, 0, KEY, 0, n)
    alt = uniform01(*other, 0, n)
    # Two independent streams agree on an element with probability 2**-32.
    assert int((base == alt).sum()) <= 2
    corr = torch.corrcoef(torch.stack([base, alt]))[0, 1].item()
    assert abs(corr) < 0.02  # 6 standard errors for n = 1e5


def test_stream_keys_are_unambiguous() -> None:
    assert stream_key(1, 23, "k") != stream_key(12, 3, "k")
    assert stream_key(0, 0, "ab") != stream_key(0, 0, "a")
    assert len({stream_key(s, i, "k") for s in range(30) for i in range(30)}) == 900


def test_uniformity_chi_square_and_ks() -> None:
    n, bins = 1_000_000, 100
    u = uniform01(20240601, 0, KEY, 123, n)
    counts = torch.bincount((u * bins).to(torch.int64), minlength=bins).to(torch.float64)
    expected = n / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 99 degrees of freedom: mean 99, sd 14; 160 is beyond the 99.99th percentile.
    assert chi2 < 160, chi2
    s, _ = torch.sort(u[:200_000])
    m = s.numel()
    grid = torch.arange(m, dtype=torch.float64)
    d = max(float(((grid + 1) / m - s).max()), float((s - grid / m).max()))
    assert d * math.sqrt(m) < 1.95, d  # Kolmogorov-Smirnov at p ~ 0.001


def test_keep_threshold_is_exact() -> None:
    """(u32 < T) == (u32 * 2**-32 < p) at and around the threshold, for awkward p."""
    ps = [0.3, 0.5, 1 / 3, 0.1, 1e-12, 5e-324, 2.0**-32, 3 * 2.0**-33, 1 - 2.0**-53, 1 - 2.0**-32, 1 - 2.0**-31]
    rnd = random.Random(3)
    ps += [rnd.random() for _ in range(200)] + [math.nextafter(p, 0.0) for p in ps] + [math.nextafter(p, 1) for p in ps]
    for p in ps:
        t = keep_threshold(p)
        assert 0 <= t <= 2**32
        centre = math.floor(p * 2**32)
        for u in range(max(0, centre - 2), min(2**32, centre + 3)):
            assert (u < t) == (u * 2.0**-32 < p), (p, u, t)
    assert keep_threshold(0.0) == 0 and keep_threshold(-0.5) == 0 and keep_threshold(float("nan")) == 0
    assert keep_threshold(1.0) == 2**32 and keep_threshold(float("inf")) == 2**32
    assert keep_threshold(2.0**-32) == 1 and keep_threshold(1 - 2.0**-32) == 2**32 - 1
    awkward = ps + [0.0, -0.5, 1.0, 2.0, math.nan, math.inf, -math.inf, 5e-324]
    assert keep_thresholds(np.array(awkward)).tolist() == [keep_threshold(p) for p in awkward]  # the array form


@pytest.mark.parametrize("p", [0.3, 1 / 3, 0.999999, 2.0**-32, 1e-300])
def test_scalar_mask_equals_float_compare(p: float) -> None:
    n = 300_001
    mask = bernoulli_mask(4, 1, KEY, 9, n, p)
    assert torch.equal(mask, uniform01(4, 1, KEY, 9, n) < p)


def test_tensor_mask_equals_float_compare() -> None:
    n = 200_003  # several blocks of the compare, the last one partial
    u = uniform01(4, 2, KEY, 11, n)
    # Probabilities on both sides of each u, and equal to it: u < p must hold exactly.
    other = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.where(torch.arange(n) % 3 == 0, u, other)
    mask = bernoulli_mask(4, 2, KEY, 11, n, p)
    assert torch.equal(mask, u < p)
    assert not bool(mask[::3].any())  # u < u never
    assert torch.equal(bernoulli_mask(4, 2, KEY, 11, n, p.float()), u < p.float().double())
    with pytest.raises(ValueError):
        bernoulli_mask(4, 2, KEY, 11, n, p[:-1])


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9, 0.99])
def test_bernoulli_rate(p: float) -> None:
    n = 400_000
    mask = bernoulli_mask(11, 2, KEY, 777, n, p)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(float(mask.double().mean()) - p) < 5 * sd


def test_bernoulli_per_element_probabilities() -> None:
    n = 200_000
    p = torch.linspace(0.0, 1.0, n)
    mask = bernoulli_mask(1, 0, KEY, 0, n, p)
    assert not bool(mask[0]) and bool(mask[-1])  # p = 0 never, p = 1 always
    lo, hi = mask[: n // 4].double().mean().item(), mask[-n // 4 :].double().mean().item()
    assert abs(lo - 0.125) < 0.01 and abs(hi - 0.875) < 0.01
    assert torch.equal(bernoulli_mask(1, 0, KEY, 0, n, 0.0), torch.zeros(n, dtype=torch.bool))
    assert torch.equal(bernoulli_mask(1, 0, KEY, 0, n, 1.0), torch.ones(n, dtype=torch.bool))


def test_edges() -> None:
    assert uniform01(0, 0, KEY, 5, 0).shape == (0,)
    assert bernoulli_mask(0, 0, KEY, 5, 0, 0.5).shape == (0,)
    assert random_u32(0, 0, KEY, MAX_ELEMENTS, 0).shape == (0,)
    with pytest.raises(ValueError):
        uniform01(0, 0, KEY, -1, 3)
    with pytest.raises(ValueError):
        uniform01(0, 0, KEY, 0, -3)
    with pytest.raises(ValueError):
        random_u32(0, 0, KEY, MAX_ELEMENTS - 2, 3)
    with pytest.raises(ValueError):
        bernoulli_mask(0, 0, KEY, MAX_ELEMENTS, 1, 0.5)


def test_speed_one_million() -> None:
    bernoulli_mask(0, 0, KEY, 0, 1000, 0.3)  # warm-up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        bernoulli_mask(0, 0, KEY, 3, 1_000_000, 0.3)
        best = min(best, time.perf_counter() - t)
    assert best < 0.05, best  # ~2 ms on one core; generous for a shared CI box


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_cuda_equals_cpu() -> None:
    cpu = uniform01(8, 1, KEY, 5, 300_001)
    gpu = uniform01(8, 1, KEY, 5, 300_001, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    p = torch.rand(300_001, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = bernoulli_mask(8, 1, KEY, 5, 300_001, p.cuda(), device="cuda")
    assert mask.device.type == "cuda" and torch.equal(mask.cpu(), bernoulli_mask(8, 1, KEY, 5, 300_001, p))


def _drop_reference(x: torch.Tensor, base: torch.Tensor, start: int, p: float, divisor: float | None) -> torch.Tensor:
    d = x - base if divisor is None else (x - base) / divisor
    return torch.where(uniform01(6, 2, KEY, start, x.numel()) < p, d, torch.zeros((), dtype=x.dtype))


def _awkward(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 1e3
    for step, value in ((97, math.nan), (89, math.inf), (83, -math.inf), (79, -0.0)):
        x[seed + step % 4 :: step] = value
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start", [0, 3, 2**34 - 4097, MAX_ELEMENTS - 10_007])
@pytest.mark.parametrize(("p", "divisor"), [(0.3, 0.3), (0.3, None), (1 / 3, 1 / 3), (2.0**-32, None), (0.0, 0.5),
                                            (1.0, 0.7), (1 - 2.0**-32, 1 - 2.0**-32)])
def test_fused_drop_delta_equals_sub_mask_divide_add(dtype: torch.dtype, start: int, p: float,
                                                     divisor: float | None) -> None:
    """drop_delta_ (DARE's fused CPU pass) against a where() over uniform01 and against the path
    a GPU takes (sub, bernoulli_mask, keep_only, div_, add_), bit for bit, NaN, inf and -0.0 included."""
    from astolfo_dist.recipe.library._taskvec import keep_only
    from astolfo_dist.recipe.workspace import Workspace

    n = 10_007
    x, base, mix = _awkward(n, dtype, 5), _awkward(n, dtype, 6), _awkward(n, dtype, 7)
    got = drop_delta_(torch.empty_like(x), x, base, 6, 2, KEY, start, p, divisor)
    summed = drop_delta_(mix.clone(), x, base, 6, 2, KEY, start, p, divisor, accumulate=True)
    reference = _drop_reference(x, base, start, p, divisor)
    assert torch.equal(got.view(torch.uint8), reference.view(torch.uint8))
    assert torch.equal(summed.view(torch.uint8), (mix + reference).view(torch.uint8))
    masked = keep_only(x - base, bernoulli_mask(6, 2, KEY, start, n, p), Workspace())
    if divisor is not None:
        masked.div_(divisor)
    assert torch.equal(got.view(torch.uint8), masked.view(torch.uint8))
    assert torch.equal(summed.view(torch.uint8), mix.clone().add_(masked).view(torch.uint8))


@settings(max_examples=60, deadline=None, database=None)
@given(start=st.one_of(st.integers(0, 40), st.integers(0, MAX_ELEMENTS - 20_000)), n=st.integers(1, 20_000),
       cuts=st.lists(st.floats(0.0, 1.0), max_size=6))
def test_fused_drop_delta_chunk_independence(start: int, n: int, cuts: list[float]) -> None:
    x, base = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    whole = drop_delta_(torch.empty(n), x, base, 6, 2, KEY, start, 0.3, 0.3)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    parts = [drop_delta_(torch.empty(b - a), x[a:b], base[a:b], 6, 2, KEY, start + a, 0.3, 0.3)
             for a, b in zip(bounds, bounds[1:], strict=False)]
    assert torch.equal(torch.cat(parts), whole)


def test_fused_drop_delta_rejects_what_it_cannot_do() -> None:
    ok = torch.ones(8)
    for bad in (torch.ones(8, 2)[:, 0], torch.ones(8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
            drop_delta_(ok.clone(), bad, ok, 0, 0, KEY, 0, 0.5)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):  # out and base: the pass's dtype
        drop_delta_(ok.half(), ok.half(), ok.half(), 0, 0, KEY, 0, 0.5)
    # An input as read in a dtype that widens exactly (float16, bfloat16 for float32) is taken as it is.
    base = torch.randn(64)
    for source in (torch.float16, torch.bfloat16):
        x = torch.randn(64).to(source)
        as_read = drop_delta_(torch.empty(64), x, base, 0, 0, KEY, 5, 0.5, 0.5)
        assert torch.equal(as_read, drop_delta_(torch.empty(64), x.float(), base, 0, 0, KEY, 5, 0.5, 0.5))
    with pytest.raises(ValueError, match="sizes differ"):
        drop_delta_(ok.clone(), ok, torch.ones(7), 0, 0, KEY, 0, 0.5)
    with pytest.raises(ValueError):
        drop_delta_(torch.ones(3), torch.ones(3), torch.ones(3), 0, 0, KEY, MAX_ELEMENTS - 2, 0.5)
    assert drop_delta_(torch.ones(0), torch.ones(0), torch.ones(0), 0, 0, KEY, MAX_ELEMENTS, 0.5).shape == (0,)
