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

from astolfo_dist.recipe.rng import (
    MAX_ELEMENTS,
    bernoulli_mask,
    keep_threshold,
    random_u32,
    stream_key,
    uniform01,
)

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
U64 = 2**64 - 1

# Random123's known-answer vectors for philox4x64-10: (counter, key, output).
PHILOX4X64_KATS = [
    ((0, 0, 0, 0), (0, 0), (0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B)),
    ((U64,) * 4, (U64, U64), (0x87B092C3013FE90B, 0x438C3C67BE8D0224, 0x9CC7D7C69CD777B6, 0xA09CAEBF594F0BA0)),
    (
        (0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89),
        (0x452821E638D01377, 0xBE5466CF34E90C6C),
        (0xA528F45403E61D95, 0x38C72DBD566E9788, 0xA5A1610E72FD18B5, 0x57BD43B5E52B7FE6),
    ),
]


def philox4x64_py(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox-4x64-10 on Python integers, written from the paper: the reference for the layout."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B97F4A7C15) & U64, (k1 + 0xBB67AE8584CAA73B) & U64
        p0, p1 = 0xD2E7470EE14C6C93 * c0, 0xCA5A826395121157 * c2
        c0, c1, c2, c3 = (p1 >> 64) ^ c1 ^ k0, p1 & U64, (p0 >> 64) ^ c3 ^ k1, p0 & U64
    return c0, c1, c2, c3


def reference_u32(seed: int, input_index: int, key: str, start: int, count: int) -> list[int]:
    """The module docstring's stream definition, element by element."""
    k0, k1, c1, c2, c3 = stream_key(seed, input_index, key)
    out = []
    for e in range(start, start + count):
        x = philox4x64_py((e // 8, c1, c2, c3), (k0, k1))
        j, h = divmod(e % 8, 2)
        out.append((x[j] >> (32 * h)) & 0xFFFFFFFF)
    return out


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X64_KATS)
def test_numpy_philox_known_answers(counter, key, expected) -> None:
    # numpy's first block is that of counter + 1 (256-bit, word 0 lowest): start one below,
    # which for the zero counter also checks the carry through all four words.
    c = sum(w << (64 * i) for i, w in enumerate(counter))
    gen = np.random.Philox(key=key[0] | key[1] << 64, counter=(c - 1) % 2**256)
    assert tuple(int(w) for w in gen.random_raw(4)) == expected


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX4X64_KATS)
def test_python_reference_known_answers(counter, key, expected) -> None:
    assert philox4x64_py(counter, key) == expected


@pytest.mark.parametrize(
    ("start", "count"),
    [(0, 20), (5, 3), (7, 2), (8, 8), (13, 29), (2**32 - 6, 12), (2**35 * 8 - 3, 7), (MAX_ELEMENTS - 11, 11)],
)
def test_stream_matches_its_definition(start: int, count: int) -> None:
    got = random_u32(77, 3, KEY, start, count)
    assert got.dtype == np.uint32
    assert got.tolist() == reference_u32(77, 3, KEY, start, count)


def test_golden_stream() -> None:
    # Pins the stream layout (version 2: key derivation, counter use, word order): masks of
    # earlier merges must stay reproducible.
    assert stream_key(1, 0, "a") == (
        8726534932847739946,
        10325899257789667683,
        17210895331898247419,
        11983741798739708336,
        15785114803443183898,
    )
    words = random_u32(1234, 2, "model.diffusion_model.out.0.weight", 0, 10)
    assert words.tolist() == [
        1857665232, 3734344767, 772172685, 620141736, 810130660,
        1560429546, 2445167131, 1517875736, 2473397466, 2608153278,
    ]  # fmt: skip
    assert random_u32(0, 0, "k", 2**40 + 3, 3).tolist() == [2871119904, 591981382, 4025363442]
    assert random_u32(0, 0, "k", MAX_ELEMENTS - 3, 3).tolist() == [992157929, 2158094220, 3944636428]
    u = uniform01(1234, 2, "model.diffusion_model.out.0.weight", 3, 2)
    assert u.tolist() == [620141736 * 2.0**-32, 810130660 * 2.0**-32]


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
