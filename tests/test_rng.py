"""The counter-based generator: Philox known answers, chunk independence, distinct streams,
uniformity, and Bernoulli rates."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from astolfo_dist.recipe.rng import _mulhilo_, bernoulli_mask, philox4x32, stream_key, uniform01

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def _words(u: torch.Tensor) -> list[int]:
    return [int(x) for x in (u * 2.0**32).to(torch.int64)]


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        # Random123's known-answer vectors for philox4x32-10.
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected) -> None:
    ctr = tuple(torch.tensor([c], dtype=torch.int64) for c in counter)
    out = philox4x32(ctr, key)
    assert tuple(int(w) for w in out) == expected
    assert ctr[0].item() == counter[0], "the caller's counter tensors are not modified"


def test_mulhilo_matches_big_integers() -> None:
    rnd = random.Random(7)
    xs = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + [rnd.getrandbits(32) for _ in range(2000)]
    x = torch.tensor(xs, dtype=torch.int64)
    for m in (0xD2511F53, 0xCD9E8D57, 0xFFFFFFFF, 1):
        lo, hi, tmp = (torch.empty_like(x) for _ in range(3))
        _mulhilo_(m, x, lo, hi, tmp)
        assert [int(v) for v in lo] == [(m * v) & 0xFFFFFFFF for v in xs]
        assert [int(v) for v in hi] == [(m * v) >> 32 for v in xs]


def test_golden_stream() -> None:
    # Pins the stream layout (key derivation, counter use, word order): masks of earlier
    # merges must stay reproducible.
    assert stream_key(1, 0, "a") == (57748941, 3856379132, 82403421, 93869438)
    u = uniform01(1234, 2, "model.diffusion_model.out.0.weight", 0, 6)
    assert _words(u) == [1289534178, 385300948, 1227531078, 2018911002, 2582715112, 3772016939]
    assert _words(uniform01(0, 0, "k", 2**40 + 3, 3)) == [2079289520, 789168586, 814903928]


def test_values_are_exact_32_bit_fractions_in_unit_interval() -> None:
    u = uniform01(3, 1, KEY, 17, 100_003)
    assert u.dtype == torch.float64 and u.shape == (100_003,)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    scaled = u * 2.0**32
    assert torch.equal(scaled, scaled.floor())


def test_chunk_independence_random_splits() -> None:
    n = 10_007
    whole = uniform01(42, 3, KEY, 0, n)
    rnd = random.Random(0)
    for _ in range(40):
        cuts = sorted(rnd.sample(range(1, n), rnd.randint(1, 12)))
        bounds = [0, *cuts, n]
        parts = [uniform01(42, 3, KEY, a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
        assert torch.equal(torch.cat(parts), whole)
    # Single elements at unaligned positions, and the 0..1000 = 0..300 + 300..1000 case.
    for i in (0, 1, 2, 3, 4, 5, 997, 10_006):
        assert torch.equal(uniform01(42, 3, KEY, i, 1), whole[i : i + 1])
    assert torch.equal(torch.cat([uniform01(42, 3, KEY, 0, 300), uniform01(42, 3, KEY, 300, 700)]), whole[:1000])


def test_chunk_independence_past_32_bit_counters() -> None:
    start = 2**34 - 5  # the counter's high word changes inside this range
    whole = uniform01(9, 0, KEY, start, 64)
    assert torch.equal(torch.cat([uniform01(9, 0, KEY, start, 7), uniform01(9, 0, KEY, start + 7, 57)]), whole)


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
    with pytest.raises(ValueError):
        uniform01(0, 0, KEY, -1, 3)
    with pytest.raises(ValueError):
        uniform01(0, 0, KEY, 0, -3)


def test_speed_one_million() -> None:
    uniform01(0, 0, KEY, 0, 1000)  # warm-up
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        uniform01(0, 0, KEY, 3, 1_000_000)
        best = min(best, time.perf_counter() - t)
    assert best < 0.5, best  # ~0.05 s on one core; generous for a shared CI box


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")
def test_cuda_equals_cpu() -> None:
    cpu = uniform01(8, 1, KEY, 5, 300_001)
    gpu = uniform01(8, 1, KEY, 5, 300_001, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
