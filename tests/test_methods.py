"""The merge-method library against independent whole-tensor float64 references.

Each method runs through a tiny driver that splits the tensor into chunks (1 element, 7,
1000, whole), runs the statistic passes (chunks shuffled, optionally split between two
pickled copies of the state merged with merge_states) and the output. A `read` hands out
a fresh copy per call and poisons the previous one with NaN, so a method that keeps a
read tensor past the next read fails loudly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import random
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astolfo_dist.errors import UsageError
from astolfo_dist.recipe.library import REGISTRY, build
from astolfo_dist.recipe.library._exact import ExactSum
from astolfo_dist.recipe.library._select import BAND_BUDGET, COLLECT_CAP, STATE_BUDGET, Selection
from astolfo_dist.recipe.library.base import WIDENED, Method
from astolfo_dist.recipe.library.breadcrumbs import Breadcrumbs, BreadcrumbsParams
from astolfo_dist.recipe.library.dare import Dare, DareParams
from astolfo_dist.recipe.library.della import Della, DellaParams
from astolfo_dist.recipe.library.geometric_median import GeometricMedian, GeometricMedianParams
from astolfo_dist.recipe.library.model_stock import ModelStock
from astolfo_dist.recipe.library.slerp import Slerp, SlerpParams
from astolfo_dist.recipe.library.task_arithmetic import TaskArithmeticParams
from astolfo_dist.recipe.library.ties import Ties, TiesParams
from astolfo_dist.recipe.rng import uniform01
from astolfo_dist.recipe.stats import exact_topk_mask

SOURCES = [torch.float16, torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------------
# Driver


class Reader:
    """read(i): chunk i of input i, a fresh copy; the previous copy is poisoned. With `sources`
    (the inputs in their own dtypes, as the worker reads them), read.source(i) and
    read.format too (as the worker's reader: the CPU's grouped statistic pass), and with
    `rows`, read.rows (several sources into a store's rows at once, as the worker's; None
    where a source's dtype does not widen to the accumulator's)."""

    def __init__(self, xs: list[torch.Tensor], start: int, n: int,
                 sources: list[torch.Tensor] | None = None, rows: bool = False) -> None:
        self.xs, self.start, self.n = xs, start, n
        self.last: torch.Tensor | None = None
        if sources is not None:
            self.source = lambda i, into=None: self._fresh(sources, i)
            self.format = (xs[0][start : start + n].numel(), xs[0].dtype, xs[0].device)
            if rows:
                self.rows = lambda inputs, store, slot: self._rows(sources, inputs, store, slot)

    def _rows(self, sources: list[torch.Tensor], inputs: list[int], store: torch.Tensor,
              slot: int) -> list[torch.dtype] | None:
        acc = self.xs[0].dtype
        if any(sources[i].dtype != acc and (sources[i].dtype, acc) not in WIDENED for i in inputs):
            return None
        for r, i in enumerate(inputs):
            chunk = sources[i][self.start : self.start + self.n].reshape(-1).view(torch.uint8)
            store[r * slot : r * slot + chunk.numel()].copy_(chunk)
        return [sources[i].dtype for i in inputs]

    def _fresh(self, xs: list[torch.Tensor], i: int) -> torch.Tensor:
        if self.last is not None:
            self.last.fill_(math.nan)
        self.last = xs[i][self.start : self.start + self.n].clone()
        return self.last

    def __call__(self, i: int) -> torch.Tensor:
        return self._fresh(self.xs, i)


def run(
    method: Method,
    xs: list[torch.Tensor],
    chunk: int,
    *,
    key: str = "model.layer.weight",
    split: bool = False,
    seed: int = 0,
    sources: list[torch.Tensor] | None = None,
    rows: bool = False,
) -> tuple[torch.Tensor, int]:
    """Output (flat, accumulator dtype) and the number of statistic passes; with `sources`, the
    reader offers them (Reader), and with `rows`, several at once."""
    numel = xs[0].numel()
    rnd = random.Random(seed)
    state = method.begin(key, numel, len(xs))
    starts = list(range(0, numel, chunk))
    passes = 0
    while not method.ready(state):
        assert passes < method.tensor_passes
        rnd.shuffle(starts)
        if split:  # two workers with pickled copies of the pass-start state
            parts = [pickle.loads(pickle.dumps(state)) for _ in range(2)]
            for s in starts:
                method.observe(parts[rnd.randrange(2)], passes, s, Reader(xs, s, chunk, sources, rows))
            state = method.merge_states(parts[0], parts[1])
        else:
            for s in starts:
                method.observe(state, passes, s, Reader(xs, s, chunk, sources, rows))
        method.end_pass(state, passes)
        passes += 1
    out = torch.full((numel,), math.nan, dtype=xs[0].dtype)
    rnd.shuffle(starts)
    for s in starts:
        n = min(chunk, numel - s)
        buf = torch.empty(n, dtype=xs[0].dtype)
        method.output(state, s, Reader(xs, s, chunk, sources, rows), buf)
        out[s : s + n] = buf
    return out, passes


def chunk_sizes(numel: int) -> list[int]:
    sizes = [1] if numel <= 64 else []
    if numel <= 2500:
        sizes.append(7)
    return [*sizes, 1000, max(numel, 1)]


def run_all(method: Method, xs: list[torch.Tensor], key: str = "model.layer.weight") -> torch.Tensor:
    """Run every chunking (and a split run); assert they agree bit for bit; return the output."""
    numel = xs[0].numel()
    outs = [run(method, xs, c, key=key, seed=c) for c in chunk_sizes(numel)]
    outs.append(run(method, xs, 7 if numel <= 2500 else 1000, key=key, split=True, seed=99))
    first = outs[0][0]
    for out, _ in outs[1:]:
        assert bits_equal(out, first), "output depends on the chunking or the split"
    return first


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    int_dtype = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(int_dtype), b.view(int_dtype))


# ---------------------------------------------------------------------------------------------
# Inputs


def source_cast(x: torch.Tensor, rnd: random.Random) -> torch.Tensor:
    """Round to a random source dtype, back to float64 (as a checkpoint would hold it)."""
    return x.to(rnd.choice(SOURCES)).to(torch.float64)


def plain_inputs(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    return [source_cast(torch.randn(shape, generator=gen, dtype=torch.float64), rnd).reshape(-1) for _ in range(n)]


def task_inputs(n_models: int, shape: tuple[int, ...], seed: int, kind: str = "normal") -> list[torch.Tensor]:
    """[base, x_1, ..., x_n]: a base and fine-tunes of it (deltas with zeros or repeated values)."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    base = source_cast(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05, rnd)
    out = [base.reshape(-1)]
    for _ in range(n_models):
        if kind == "repeated":  # few distinct deltas: heavy ties at nonzero magnitudes
            delta = torch.randint(-3, 4, shape, generator=gen).double() * 2.0**-7
        else:
            delta = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.01
            delta[torch.rand(shape, generator=gen) < 0.2] = 0.0  # untouched weights
        x = base + delta
        out.append((x if kind == "repeated" else source_cast(x, rnd)).reshape(-1))
    return out


CASES = [(2, (5,)), (3, (7, 3)), (5, (33, 17)), (16, (101,)), (3, (64, 130))]


def case_id(case: tuple[int, tuple[int, ...]]) -> str:
    return f"n{case[0]}-{'x'.join(map(str, case[1]))}"


# ---------------------------------------------------------------------------------------------
# Independent float64 references (whole tensors, plain torch)


def ordered_sum(values) -> float:
    total = 0.0
    for v in values:
        total += v
    return total


def ref_weighted_sum(xs, weights):
    acc = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:], strict=True):
        acc = acc + x * w
    return acc


def ceil_fraction(numel: int, frac: float) -> int:
    return min(numel, math.ceil(Fraction(str(frac)) * numel))


def top_by_magnitude(d: torch.Tensor, k: int) -> torch.Tensor:
    """Rank 0 = the largest |d|; equal magnitudes in element-index order (a stable sort)."""
    order = torch.sort(-d.abs(), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(d.numel())
    return rank < k


def ref_combine(base, deltas, weights, lam, normalize, election, consensus="sum"):
    d = [delta * w for delta, w in zip(deltas, weights, strict=True)]
    if election:
        score = torch.zeros_like(base)
        for x in d:
            score = score + (x if consensus == "sum" else torch.sign(x))
        plus = score >= 0
        agree = [torch.where(plus, x > 0, x < 0) for x in d]
    else:
        agree = [torch.ones_like(base, dtype=torch.bool) for _ in d]
    mix = torch.zeros_like(base)
    for x, a in zip(d, agree, strict=True):
        mix = mix + torch.where(a, x, 0.0)
    if normalize:
        if election:
            div = torch.zeros_like(base)
            for a, w in zip(agree, weights, strict=True):
                div = div + a.double() * w
            mix = mix / torch.where(div == 0, 1.0, div)
        else:
            total = ordered_sum(weights)
            mix = mix / (total if total != 0 else 1.0)
    return mix * lam + base


def fsum_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.fsum((a * b).tolist())


def ref_slerp(a, b, t, threshold=0.9995):
    na, nb = math.sqrt(fsum_dot(a, a)), math.sqrt(fsum_dot(b, b))
    cos = 2.0 if na == 0 or nb == 0 else min(1.0, max(-1.0, fsum_dot(a, b) / na / nb))
    if abs(cos) > threshold:
        s0, s1 = 1.0 - t, t
    else:
        theta = math.acos(cos)
        s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return a * s0 + b * s1, cos


def ref_model_stock(base, xs):
    n = len(xs)
    d = [x - base for x in xs]
    norms = [math.sqrt(fsum_dot(v, v)) for v in d]
    cosines = [
        0.0 if norms[j] == 0 or norms[k] == 0 else fsum_dot(d[j], d[k]) / norms[j] / norms[k]
        for j in range(n)
        for k in range(j + 1, n)
    ]
    cos = min(1.0, max(-1.0, math.fsum(cosines) / len(cosines)))
    t = n * cos / (1 + (n - 1) * cos) if 1 + (n - 1) * cos > 0 else 0.0
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total / n * t + base * (1 - t), t


def ref_weiszfeld(xs, eps, maxiter, tol, exact: bool):
    """exact=True: the documented arithmetic (fsum distances); False: torch.linalg norms."""
    n = len(xs)
    w = [1.0 / n] * n

    def estimate(w):
        z = xs[0] * w[0]
        for x, wi in zip(xs[1:], w[1:], strict=True):
            z = z + x * wi
        return z / ordered_sum(w)

    for _ in range(maxiter):
        z = estimate(w)
        if exact:
            dist = [math.sqrt(fsum_dot(x - z, x - z)) for x in xs]
        else:
            dist = torch.linalg.vector_norm(torch.stack(xs) - z, dim=1).tolist()
        inv = [1.0 / max(eps, v) for v in dist]
        new = [v / math.fsum(inv) for v in inv]
        change = max(abs(a - b / math.fsum(w)) for a, b in zip(new, w, strict=True))
        w = new
        if change < tol:
            break
    return estimate(w)


def della_probs(d: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    bins = torch.from_numpy((np.abs(d.numpy()).astype(np.float32).view(np.uint32) >> 19).astype(np.int64))
    counts = torch.bincount(bins, minlength=4096)
    below = torch.cumsum(counts, 0) - counts
    n = d.numel()
    r = (2 * below[bins] + counts[bins] - 1).double() / (2 * (n - 1)) if n > 1 else torch.full_like(d, 0.5)
    return ((density - epsilon / 2) + r * epsilon).clamp(max=1.0)


# ---------------------------------------------------------------------------------------------
# Elementwise methods


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_weighted_sum_uniform_add_difference(case):
    n, shape = case
    xs = plain_inputs(max(n, 3), shape, seed=n)
    rnd = random.Random(n)
    weights = [rnd.uniform(-0.5, 1.5) for _ in xs]
    out = run_all(build("weighted_sum", {"weights": weights}), xs)
    assert bits_equal(out, ref_weighted_sum(xs, weights))
    out = run_all(build("weighted_sum", {"weights": weights, "normalize": True}), xs)
    assert bits_equal(out, ref_weighted_sum(xs, weights) / ordered_sum(weights))
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    assert bits_equal(run_all(build("uniform"), xs), total / len(xs))
    a, b, c = xs[:3]
    assert bits_equal(run_all(build("add_difference", {"alpha": 0.7}), [a, b, c]), (b - c) * 0.7 + a)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_task_arithmetic(case):
    n, shape = case
    xs = task_inputs(n, shape, seed=10 + n)
    weights = [0.3 + 0.1 * i for i in range(n)]
    for normalize in (False, True):
        method = build("task_arithmetic", {"weights": weights, "lambda": 0.9, "normalize": normalize}, base=0)
        out = run_all(method, xs)
        ref = ref_combine(xs[0], [x - xs[0] for x in xs[1:]], weights, 0.9, normalize, election=False)
        assert bits_equal(out, ref)


# ---------------------------------------------------------------------------------------------
# Exact selections: ties, breadcrumbs


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("kind", ["normal", "repeated"])
def test_ties(case, kind):
    n, shape = case
    xs = task_inputs(n, shape, seed=20 + n, kind=kind)
    base = xs[0]
    numel = base.numel()
    weights = [1.0 - 0.05 * i for i in range(n)]
    for density, consensus, normalize in ((0.3, "sum", None), (0.1, "count", False), (0.75, "sum", True)):
        params = {"density": density, "weights": weights, "lambda": 1.2, "consensus": consensus}
        if normalize is not None:
            params["normalize"] = normalize
        out = run_all(build("ties", params, base=0), xs)
        k = ceil_fraction(numel, density)
        deltas = [torch.where(top_by_magnitude(x - base, k), x - base, 0.0) for x in xs[1:]]
        norm = True if normalize is None else normalize
        ref = ref_combine(base, deltas, weights, 1.2, norm, election=True, consensus=consensus)
        assert bits_equal(out, ref), (density, consensus)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_breadcrumbs(case):
    n, shape = case
    xs = task_inputs(n, shape, seed=30 + n, kind="repeated" if n == 5 else "normal")
    base = xs[0]
    numel = base.numel()
    for beta, gamma, election in ((0.1, 0.5, False), (0.01, 0.9, True), (0.0, 0.3, False)):
        method = build("breadcrumbs", {"beta": beta, "gamma": gamma, "sign_election": election}, base=0)
        out = run_all(method, xs)
        top = ceil_fraction(numel, beta)
        keep = max(top, numel - ceil_fraction(numel, gamma))
        deltas = []
        for x in xs[1:]:
            d = x - base
            band = top_by_magnitude(d, keep) & ~top_by_magnitude(d, top)
            deltas.append(torch.where(band, d, 0.0))
        ref = ref_combine(base, deltas, [1.0] * n, 1.0, election, election=election)
        assert bits_equal(out, ref), (beta, gamma, election)


# ---------------------------------------------------------------------------------------------
# Random methods: dare, della


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dare(case):
    n, shape = case
    xs = task_inputs(n, shape, seed=40 + n)
    base, numel, key = xs[0], xs[0].numel(), "unet.block.3.weight"
    for density, election, rescale in ((0.3, False, True), (0.6, True, True), (0.5, False, False)):
        params = {"density": density, "sign_election": election, "rescale": rescale, "seed": 7}
        out = run_all(build("dare", params, base=0), xs, key=key)
        deltas = []
        for i, x in enumerate(xs[1:], start=1):
            kept = torch.where(uniform01(7, i, key, 0, numel) < density, x - base, 0.0)
            deltas.append(kept / density if rescale else kept)
        ref = ref_combine(base, deltas, [1.0] * n, 1.0, election, election=election)
        assert bits_equal(out, ref), (density, election, rescale)


def test_dare_fused_cpu_pass_equals_the_mask_path_a_gpu_takes(monkeypatch):
    """On the CPU, DARE's deltas take one fused pass (Dare.fused_delta); a GPU takes the default
    (sub, host mask, keep_only, div, add). Same bits, through the mix and through election and weights."""
    from astolfo_dist.recipe.library.dare import Dare

    xs = task_inputs(5, (70, 50), seed=21)
    gen = torch.Generator().manual_seed(5)
    for x in xs[1:]:
        spots = torch.randperm(x.numel(), generator=gen)[:40]
        x[spots[:10]], x[spots[10:20]], x[spots[20:30]] = math.nan, math.inf, -math.inf
        x[spots[30:]] = xs[0][spots[30:]]
    configs = [{"density": 0.3}, {"density": 0.6, "sign_election": True}, {"density": 0.5, "rescale": False},
               {"density": 0.4, "weights": [1.0, 0.5, 2.0, 1.0, 0.25]}, {"density": 0.3, "consensus": "count",
                                                                   "sign_election": True, "normalize": False}]
    fused = [run_all(build("dare", {**c, "seed": 2}, base=0), xs) for c in configs]
    monkeypatch.setattr(Dare, "fused_delta", lambda self, *args, **kwargs: False)
    for config, out in zip(configs, fused, strict=True):
        unfused = run_all(build("dare", {**config, "seed": 2}, base=0), xs)
        assert bits_equal(torch.nan_to_num(out, nan=0.5), torch.nan_to_num(unfused, nan=0.5)), config
        assert torch.equal(out.isnan(), unfused.isnan()), config


FUSED_CONFIGS = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "consensus": "count", "weights": [1.0, 0.5, 2.0, 1.0, 0.25]}),
    ("ties", {"density": 0.4, "sign_election": False}),
    ("ties", {"density": 0.0}),
    ("ties", {"density": 1.0, "normalize": False, "lambda": 0.7}),
    ("ties", {"density": 0.3, "lambda": 0.3, "weights": [-0.5, 1.0, 0.3, 2.0, 1.0]}),
    ("breadcrumbs", {"beta": 0.6, "gamma": 0.05, "sign_election": True}),
    ("dare", {"density": 0.4, "sign_election": True, "seed": 2}),
    ("dare", {"density": 1e-46, "seed": 2}),  # 0 in float32: dropped 0 / 0 is NaN on both paths, no exception
    ("della", {"density": 1e-46, "epsilon": 0.0, "seed": 2}),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 2}),
    ("della", {"density": 0.3, "epsilon": 0.0, "sign_election": False, "seed": 4}),
    ("della", {"density": 0.6, "epsilon": 0.3, "rescale": False, "weights": [1.0, 0.5, 2.0, 1.0, 0.25], "seed": 4}),
    ("task_arithmetic", {"sign_election": True, "consensus": "count", "normalize": False}),
]


def test_fused_cpu_kernels_equal_the_torch_path_a_gpu_takes(monkeypatch):
    """On the CPU, TIES's and DELLA's deltas, every sign election's sums and its final pick take
    one fused pass each (_fused.topk_delta, topk_sides_group, della_delta, sides_add, sides_finish); a GPU takes
    torch operations. Same bits, with NaN, inf and zero deltas, float32 and float64, many chunks."""
    from astolfo_dist.recipe.library import _fused

    calls = {"topk_delta": 0, "sides_add": 0, "topk_sides_group": 0, "sides_finish": 0, "della_delta": 0}
    for name in calls:
        def counted(*args, _kernel=getattr(_fused, name), _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(_fused, name, counted)
    gen = torch.Generator().manual_seed(5)
    inputs = []
    for dtype in (torch.float32, torch.float64):
        xs = [x.to(dtype) for x in task_inputs(5, (70, 50), seed=22)]
        for x in xs[1:]:
            spots = torch.randperm(x.numel(), generator=gen)[:40]
            x[spots[:10]], x[spots[10:20]], x[spots[20:30]] = math.nan, math.inf, -math.inf
            x[spots[30:]] = xs[0][spots[30:]]
        inputs.append(xs)
    fused = [run_all(build(name, params, base=0), xs) for name, params in FUSED_CONFIGS for xs in inputs]
    assert all(calls.values()), calls  # the fast paths ran
    monkeypatch.setattr(_fused, "supported", lambda *tensors: False)
    unfused = [run_all(build(name, params, base=0), xs) for name, params in FUSED_CONFIGS for xs in inputs]
    for (name, params), a, b in zip([c for c in FUSED_CONFIGS for _ in inputs], fused, unfused, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and bits_equal(a.nan_to_num(0.5), b.nan_to_num(0.5)), (name, params)


def test_the_kernels_widen_every_float16_and_bfloat16_pattern_as_torch_does():
    """_fused._widen reads 16-bit floats as they are: every pattern, NaNs, infinities and
    subnormals included, becomes torch's float32, bit for bit."""
    from astolfo_dist.recipe.library import _fused

    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        x = patterns.view(dtype)
        out, zero = torch.empty(x.numel()), torch.zeros(x.numel())
        _fused.topk_delta(out, x, zero, 0, Selection(x.numel(), x.numel()).result, accumulate=False)  # x - 0, all kept
        assert bits_equal(out, x.float() - zero), dtype


def test_the_float16_rebias_for_cpus_without_a_half_instruction_widens_as_torch_does():
    """Where the CPU has no half-to-float instruction (_fused.HALF_BY_FPEXT false), _widen
    rebiases a float16's bits with integer operations instead: every pattern gives torch's
    float32 there too (compiled here whatever this CPU has)."""
    import numba

    from astolfo_dist.recipe.library import _fused

    @numba.njit
    def widen(bits, out):
        for i in range(bits.shape[0]):
            out[i] = _fused._widen_half_by_rebias(bits[i])

    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    out = torch.empty(x.numel())
    widen(x.view(torch.int16).numpy().view(np.uint16), out.numpy())
    assert bits_equal(out, x.float())

def test_a_kernel_marked_for_wide_vectors_is_compiled_for_them():
    """_fused._wide_vectors gives its kernel LLVM's preferred vector width of 512 bits (the
    function attribute is in the IR); on a CPU with AVX-512 its loop then uses zmm registers.
    (Unmarked, the loop uses them too on CPUs whose tuning prefers 512 bits, such as AMD's
    Zen 4: only Intel's prefers 256, so the unmarked loop is not checked.)"""
    import numba
    from llvmlite import binding as llvm_binding

    from astolfo_dist.recipe.library import _fused

    def body(x, out):
        for i in range(x.shape[0]):
            out[i] = x[i] * np.float32(2) + out[i]

    @numba.njit
    def marked(x, out):
        _fused._wide_vectors()
        body_loop(x, out)

    body_loop = numba.njit(inline="always")(body)
    plain = numba.njit(body)
    x, out = np.ones(4096, np.float32), np.zeros(4096, np.float32)
    marked(x, out)
    plain(x, out)
    assert np.array_equal(out, np.full(4096, 4, np.float32))
    sig = marked.signatures[0]
    assert '"prefer-vector-width"="512"' in marked.inspect_llvm(sig)
    if numba.config.CPU_NAME in (None, "host") and llvm_binding.get_host_cpu_features().get("avx512f", False):
        assert "zmm" in marked.inspect_asm(sig)



@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 5000), shift=st.integers(8, 20), every=st.integers(1, 3), source=st.booleans(),
       double=st.booleans(), seed=st.integers(0, 2**16))
def test_band_gather_takes_every_key_of_the_band_edges_included(n, shift, every, source, double, seed):
    """_fused.band_gather against torch: the keys whose digit lies in [lo, hi], the lowest and
    highest keys of the band and their neighbours just outside planted, in element order with
    their indices; the count above. And _fused.sample_histogram: the digits of the keys of
    every `every`-th block counted, how many, the largest key. Sizes cover partial tiles and
    partial blocks of the in-band scan; float32 and float64 deltas (32- and 64-bit keys)."""
    from astolfo_dist.recipe.library import _fused

    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=gen) * 0.5).half() if source else torch.randn(n, generator=gen)
    base = torch.randn(n, generator=gen) * 0.01
    wide, ints, bits = (torch.float64, torch.int64, 63) if double else (torch.float32, torch.int32, 31)
    nan_key = 0x7FF0000000000001 if double else 0x7F800001
    if double:
        x, base, shift = (x if source else x.double()), base.double(), shift + 32
    def magnitude_keys(x: torch.Tensor) -> torch.Tensor:  # stats.magnitude_bits: every NaN one key above inf
        return ((x.to(wide) - base).view(ints) & ((1 << bits) - 1)).clamp(max=nan_key)

    keys = magnitude_keys(x)
    digits = keys >> shift
    lo = int(digits.kthvalue(max(1, n - n // 5)).values)
    hi = lo + int(torch.randint(0, 3, (1,), generator=gen))
    lo_key, hi_key = lo << shift, ((hi + 1) << shift) - 1
    if not source:  # exactly at the edges and just outside (over a zero base: x - 0 is x)
        spots = torch.randperm(n, generator=gen)[: min(n, 8)]
        edges = torch.tensor([lo_key, hi_key, lo_key - 1, hi_key + 1] * 2, dtype=ints)[: spots.numel()]
        x[spots], base[spots] = edges.view(wide), 0.0
        keys = magnitude_keys(x)
        assert torch.equal(keys[spots], edges.clamp(max=nan_key))
    keys_out, index_out = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    banded, above = _fused.band_gather(x, base, shift, lo, hi, keys_out, index_out, 7)
    inside = ((keys >= lo_key) & (keys <= hi_key)).nonzero().flatten()
    assert banded == inside.numel() and above == int((keys > hi_key).sum())
    assert torch.equal(keys_out[:banded], keys[inside].long()) and torch.equal(index_out[:banded], inside + 7)

    hist = torch.zeros(1 << (bits - shift), dtype=torch.int32)
    block = _fused.SAMPLE_BLOCK
    sampled, kmax = _fused.sample_histogram(x, base, shift, hist, every * block)
    picked = torch.cat([keys[s : s + block] for s in range(0, n, every * block)])
    assert sampled == picked.numel() and kmax == int(picked.max())
    assert torch.equal(hist, torch.bincount(picked >> shift, minlength=hist.numel()).int())


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 5000), slots=st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True),
       source=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), base_as_read=st.booleans(),
       double=st.booleans(), rooms=st.lists(st.integers(0, 300), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_band_gather_group_gathers_what_band_gather_does_per_row(n, slots, source, base_as_read, double, rooms,
                                                                  seed):
    """_fused.band_gather_group: several rows as read (float16, bfloat16 or float32, at any
    slots of the store), each with a band of its own, against one base as read or already
    widened, float32 or float64 deltas: per row the keys, indices and counts band_gather finds
    with the base widened first, and where a row's room is smaller than its band, its first
    keys in the room and the count of all of them. Each room is a slice of a larger buffer
    (as a band's free part is): nothing before or after it is written."""
    from astolfo_dist.recipe.library import _fused

    gen = torch.Generator().manual_seed(seed)
    delta = torch.float64 if double else torch.float32
    slot = n * torch.empty(0, dtype=delta).element_size()
    store = torch.zeros((max(slots) + 1) * slot, dtype=torch.uint8)
    wide_base = (torch.randn(n, generator=gen) * 0.01).to(source).to(delta)
    base = wide_base.to(source) if base_as_read else wide_base
    rows, bands, outs, expected = [], [], [], []
    guarded = [torch.full((rooms[g // 2] + 20,), -5, dtype=torch.int64) for g in range(2 * len(slots))]
    for g, k in enumerate(slots):
        x = (torch.randn(n, generator=gen) * 0.5).to(source)
        x[torch.randperm(n, generator=gen)[: n // 50]] = math.nan
        store[k * slot : k * slot + n * x.element_size()].copy_(x.view(torch.uint8))
        shift = int(torch.randint(8, 20, (1,), generator=gen)) + (32 if double else 0)
        ints, bits = (torch.int64, 63) if double else (torch.int32, 31)
        digits = ((x.to(delta) - wide_base).view(ints) & ((1 << bits) - 1)) >> shift  # NaNs at the top: not kth
        lo = int(digits.kthvalue(max(1, n - n // 4)).values)
        band = (shift, lo, lo + int(torch.randint(0, 3, (1,), generator=gen)))
        full = [torch.empty(n, dtype=torch.int64) for _ in range(2)]
        expected.append((_fused.band_gather(x, wide_base, *band, *full, 11), [t.clone() for t in full]))
        rows.append(x)
        bands.append(band)
        outs.append([guarded[2 * g + h][10 : 10 + rooms[g]] for h in range(2)])
    banded, above = _fused.band_gather_group(store, slots, source, slot, base, delta, 11, bands,
                                             [k for k, _ in outs], [i for _, i in outs])
    for g, (((want_banded, want_above), (keys, index)), (got_keys, got_index)) in enumerate(
            zip(expected, outs, strict=True)):
        assert (banded[g], above[g]) == (want_banded, want_above), g
        kept = min(rooms[g], want_banded)
        assert torch.equal(got_keys[:kept], keys[:kept]) and torch.equal(got_index[:kept], index[:kept]), g
        assert bool((got_keys[kept:] == -5).all() and (got_index[kept:] == -5).all()), g
    for g, buffer in enumerate(guarded):  # nothing before or past any room
        assert bool((buffer[:10] == -5).all() and (buffer[10 + rooms[g // 2] :] == -5).all()), g
    assert all(want > 0 for (want, _), _ in expected)  # every band holds keys


def inputs_as_read(source: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Five task inputs in `source` (the first the base), each other with NaN, inf and zero
    deltas planted."""
    gen = torch.Generator().manual_seed(seed)
    originals = [x.to(source) for x in task_inputs(5, (60, 70), seed=seed)]
    for x in originals[1:]:
        spots = torch.randperm(x.numel(), generator=gen)[:30]
        x[spots[:10]], x[spots[10:20]] = math.nan, math.inf
        x[spots[20:]] = originals[0][spots[20:]]  # zero deltas
    return originals


@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("accumulator", [torch.float32, torch.float64])
def test_ties_reads_inputs_as_they_are_with_the_same_bits(source, accumulator):
    """The worker hands the CPU kernels float16 and bfloat16 chunks unconverted (read.source):
    TIES's statistic pass and output equal those of chunks converted first, bit for bit, with
    NaN, inf and ties, several chunkings, split passes."""
    if (source, accumulator) not in WIDENED and source != accumulator:
        pytest.skip("not read as it is")
    originals = inputs_as_read(source, seed=31)
    xs = [x.to(accumulator) for x in originals]
    for params in ({"density": 0.3}, {"density": 0.5, "consensus": "count", "weights": [1.0, 0.5, 2.0, -1.0, 0.3]},
                   {"density": 0.4, "sign_election": False, "weights": [1.0, 0.5, 2.0, 1.0, 1.0]}):
        method = build("ties", params, base=0)
        for chunk in (1000, 4200):
            for split in (False, True):
                converted, passes = run(method, xs, chunk, split=split)
                as_read, passes_read = run(method, xs, chunk, split=split, sources=originals)
                assert passes == passes_read
                assert torch.equal(converted.isnan(), as_read.isnan()), (params, chunk)
                assert bits_equal(converted.nan_to_num(0.5), as_read.nan_to_num(0.5)), (params, chunk, split)


@pytest.mark.parametrize("band_cap", [300, 420, 900])
def test_ties_grouped_statistic_pass_feeds_alone_an_input_without_a_band(band_cap, monkeypatch):
    """The CPU's statistic pass takes all inputs of a chunk at once (_select.feed_group). Where
    an input's first chunk admits no band (its deltas mostly zero: one digit holds more keys
    than the band's room), it is fed its histogram on its own while the others gather their
    bands in one kernel call, at their slots; with small rooms, bands also overflow or miss
    along the way and their inputs drop out of the calls. The same passes and bits as feeding
    each input alone (a reader without read.format), whose run calls no grouped kernel."""
    from astolfo_dist.recipe.library import _fused, _select, _taskvec

    monkeypatch.setattr(_taskvec, "band_cap_for", lambda selections: band_cap)  # ~50 keys per first chunk at 420
    opened, calls = [], []
    choose = _select.Selection._open_band
    monkeypatch.setattr(_select.Selection, "_open_band",
                        lambda self, *a: (opened.append(choose(self, *a)), opened[-1])[1])
    kernel = _fused.band_gather_group
    monkeypatch.setattr(_fused, "band_gather_group", lambda store, slots, *a: (calls.append(slots),
                                                                               kernel(store, slots, *a))[1])
    originals = inputs_as_read(torch.float16, seed=43)
    mostly_zero = torch.rand(originals[2].numel(), generator=torch.Generator().manual_seed(5)) < 0.85
    originals[2][mostly_zero] = originals[0][mostly_zero]  # input 2: slot 1 (the second of the non-base inputs)
    xs = [x.float() for x in originals]
    method = build("ties", {"density": 0.3}, base=0)
    every_call = []
    for chunk in (1000, 4200):
        opened.clear()
        calls.clear()
        alone, passes = run(method, xs, chunk)
        chosen = opened.copy()
        assert False in chosen and not calls, chosen
        opened.clear()
        grouped, passes_grouped = run(method, xs, chunk, sources=originals)
        assert opened == chosen and passes == passes_grouped
        assert bool(calls) == (True in chosen) and all(1 not in slots for slots in calls), calls  # input 2: alone
        assert torch.equal(alone.isnan(), grouped.isnan()) and bits_equal(alone.nan_to_num(0.5),
                                                                          grouped.nan_to_num(0.5)), chunk
        every_call += calls
    if band_cap >= 420:  # at the whole tensor's chunk, the other four inputs' bands fit: gathered at their slots
        assert [0, 2, 3, 4] in every_call, every_call
    if band_cap == 420:  # at chunk 1000, bands that overflow or miss along the pass leave the calls
        assert any(len(slots) == 1 for slots in every_call), every_call


@pytest.mark.parametrize("source", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dare", "della"])
def test_random_methods_read_inputs_as_they_are_with_the_same_bits(source, name):
    """DARE's and DELLA's fused CPU passes take float16 and bfloat16 chunks unconverted
    (read.source): their outputs equal those of chunks converted first, bit for bit, with
    NaN, inf and zero deltas, with and without sign election."""
    originals = inputs_as_read(source, seed=37)
    xs = [x.float() for x in originals]
    for params in ({"density": 0.3, "seed": 3}, {"density": 0.6, "seed": 4, "sign_election": True},
                   {"density": 0.5, "seed": 5, "weights": [1.0, 0.5, 2.0, -1.0, 0.3], "rescale": False}):
        method = build(name, params, base=0)
        for chunk in (1000, 4200):
            converted, _ = run(method, xs, chunk)
            as_read, _ = run(method, xs, chunk, sources=originals)
            assert torch.equal(converted.isnan(), as_read.isnan()), (params, chunk)
            assert bits_equal(converted.nan_to_num(0.5), as_read.nan_to_num(0.5)), (params, chunk)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("group", [3, 8])
def test_ties_output_groups_of_inputs_as_read_equal_the_torch_path(group, rows, monkeypatch):
    """On the CPU, TIES's output takes the inputs as read, `GROUP` per pass over the chunk, a
    group ending where the dtype changes (_fused.topk_sides_group); a GPU takes torch
    operations, one input at a time. Same bits, over 11 inputs in runs of float16, bfloat16
    and float32, with NaN, inf and zero deltas, weights and both consensus rules; the inputs
    read one by one or a window at a time (read.rows)."""
    from astolfo_dist.recipe.library import _fused, _taskvec

    monkeypatch.setattr(_taskvec, "GROUP", group)
    calls = []
    kernel = _fused.topk_sides_group
    monkeypatch.setattr(_fused, "topk_sides_group",
                        lambda store, rows, *a, **k: (calls.append(rows), kernel(store, rows, *a, **k)))
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32] + [torch.float16] * 3 + [torch.bfloat16] * 2 + [torch.float16] * 4 + [torch.float32] * 2
    originals = [x.to(dtype) for x, dtype in zip(task_inputs(11, (40, 90), seed=12), dtypes, strict=True)]
    for x in originals[1:]:
        spots = torch.randperm(x.numel(), generator=gen)[:30]
        x[spots[:10]], x[spots[10:20]] = math.nan, -math.inf
        x[spots[20:]] = originals[0][spots[20:]].to(x.dtype)
    xs = [x.float() for x in originals]
    configs = [{"density": 0.3}, {"density": 0.6, "consensus": "count", "lambda": 0.5,
                                  "weights": [1.0, 0.5, 2.0, -1.0, 0.3, 1.0, 1.0, 0.7, 1.5, 1.0, 2.5]}]
    read_rows = _taskvec.read_rows
    by_rows = []
    monkeypatch.setattr(_taskvec, "read_rows", lambda *a: (by_rows.append(read_rows(*a)), by_rows[-1])[1])
    fused = [run(build("ties", c, base=0), xs, 1000, sources=originals, rows=rows)[0] for c in configs]
    assert by_rows and all((got is not None) == rows for got in by_rows)  # read.rows, where the reader has it
    # The dtype runs after the base (f16 x3, bf16 x2, f16 x4, f32 x2) within windows of `group` inputs
    runs = [3, 2, 3, 1, 2] if group > 3 else [3, 2, 1, 3, 2]
    assert calls == runs * len(configs) * -(-xs[0].numel() // 1000), calls  # every chunk, every input once
    monkeypatch.setattr(_fused, "supported", lambda *tensors: False)
    unfused = [run(build("ties", c, base=0), xs, 1000, sources=originals)[0] for c in configs]
    for c, a, b in zip(configs, fused, unfused, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and bits_equal(a.nan_to_num(0.5), b.nan_to_num(0.5)), c


@settings(max_examples=60, deadline=None, database=None)
@given(n=st.integers(1, 3000), start=st.integers(0, 5000), rows=st.integers(1, 4), seed=st.integers(0, 2**16),
       data=st.data())
def test_group_output_keeps_what_the_index_compare_keeps(n, start, rows, seed, data):
    """topk_sides_group keeps by one bound per row on each side of its cut (a tile ends at a
    cut inside it): against TopKResult.mask's rule in torch (by index), then sides_add and
    sides_finish, bit for bit, for thresholds among heavily tied keys (float16 deltas), cuts
    anywhere in and around the chunk (tile edges too), rows that keep nothing or everything,
    with and without normalize's weight sums, in one group or two, the base as read (float16)
    or in float32."""
    from types import SimpleNamespace

    from astolfo_dist.recipe.library import _fused

    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.05).half().float()
    xs = [(torch.randn(n, generator=gen) * 0.05).half() for _ in range(rows)]
    tile = _fused.GROUP_TILE
    results, weights = [], []
    for x in xs:
        keys = ((x.float() - base).view(torch.int32) & 0x7FFFFFFF)
        kind = data.draw(st.sampled_from(["cut", "none", "all"]))
        total = start + n + 50
        if kind == "cut":
            edge = data.draw(st.sampled_from([0, 1, -1]))
            cut = data.draw(st.one_of(st.integers(0, total), st.sampled_from(
                [max(0, start + t + edge) for t in range(0, n + tile, tile)])))
            threshold = int(keys[data.draw(st.integers(0, n - 1))])
            results.append(SimpleNamespace(k=1, numel=total, threshold_bits=threshold, n_equal_to_keep=1,
                                           cut_index=cut))
        else:
            results.append(SimpleNamespace(k=0 if kind == "none" else total, numel=total, threshold_bits=0,
                                           n_equal_to_keep=0, cut_index=0))
        weights.append(data.draw(st.sampled_from([1.0, 0.5, -2.0])))
    weighted, split = data.draw(st.booleans()), data.draw(st.integers(0, rows - 1))
    given_base = base.half() if data.draw(st.booleans()) else base
    store = torch.cat([x.view(torch.uint8) for x in xs])
    sums = [torch.empty(n) for _ in range(5)]
    sides = (sums[3], sums[4]) if weighted else None
    if split:  # two groups: the first's sums written out, the second's read back
        _fused.topk_sides_group(store, split, torch.float16, 2 * n, given_base, start, results[:split], weights[:split],
                                *sums[:3], False, sides, first=True, lambda_=None)
    _fused.topk_sides_group(store[split * 2 * n :], rows - split, torch.float16, 2 * n, given_base, start,
                            results[split:], weights[split:], *sums[:3], False, sides, first=not split,
                            lambda_=0.7)
    ref = [torch.empty(n) for _ in range(5)]
    index = torch.arange(start, start + n)
    for g, (x, result, w) in enumerate(zip(xs, results, weights, strict=True)):
        d = x.float() - base
        keys = d.view(torch.int32) & 0x7FFFFFFF  # no NaN here: the key is the pattern
        if result.k == 0:
            keep = torch.zeros(n, dtype=torch.bool)
        elif result.k == result.numel:
            keep = torch.ones(n, dtype=torch.bool)
        else:  # TopKResult.mask
            keep = (keys > result.threshold_bits) | ((keys == result.threshold_bits) & (index < result.cut_index))
        d = torch.where(keep, d, 0.0)
        if w != 1.0:
            d.mul_(w)
        _fused.sides_add(d, *ref[:3], False, (ref[3], ref[4]) if weighted else None, w, first=g == 0)
    _fused.sides_finish(*ref[:3], (ref[3], ref[4]) if weighted else None, 0.7, base)
    assert torch.equal(sums[1].view(torch.int32), ref[1].view(torch.int32))


def test_fused_kernels_refuse_mismatched_buffers():
    """The kernels index without bounds checks (numba): their wrappers refuse what would overrun."""
    from astolfo_dist.recipe.library import _fused

    sel = Selection(10, 3)
    while not sel.done:
        sel.feed(torch.arange(10.0), 0)
        sel.end_pass()
    ten, three = torch.zeros(10), torch.zeros(3)
    with pytest.raises(ValueError, match="sizes differ"):
        _fused.topk_delta(ten, three, ten, 0, sel.result, accumulate=False)
    with pytest.raises(ValueError, match="sizes differ"):
        _fused.sides_add(ten, three, ten.clone(), ten.clone(), False, None, 1.0)
    with pytest.raises(ValueError, match="bins"):
        _fused.digit_histogram(ten, 0, 0, 31, 16, torch.zeros(8, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="key slots"):
        _fused.digit_histogram(ten, 16, 0, 31, 15, torch.zeros(1 << 15, dtype=torch.int32), three.int())


@pytest.mark.parametrize("name", ["dare", "ties"])
@pytest.mark.parametrize("election", [False, True])
def test_non_finite_deltas_are_dropped_and_kept_as_the_reference_does(name, election):
    """NaN, +-inf and -0.0 in the deltas: a dropped or disagreeing one adds +0, a kept one
    carries through (the masking is bitwise, not masked_fill: this pins its semantics)."""
    xs = task_inputs(4, (40, 30), seed=9)
    base, numel, key = xs[0], xs[0].numel(), "unet.block.3.weight"
    gen = torch.Generator().manual_seed(4)
    for x in xs[1:]:
        spots = torch.randperm(numel, generator=gen)[:60]
        x[spots[:15]] = math.nan
        x[spots[15:30]] = math.inf
        x[spots[30:45]] = -math.inf
        x[spots[45:]] = base[spots[45:]]  # zero deltas
    weights = [1.0, 0.5, 2.0, 0.25]
    density = 0.6 if name == "dare" else 1.0
    params = {"density": density, "sign_election": election, "weights": weights}
    if name == "dare":
        params["seed"] = 3
    out = run_all(build(name, params, base=0), xs, key=key)
    deltas = []
    for i, x in enumerate(xs[1:], start=1):
        keep = uniform01(3, i, key, 0, numel) < density if name == "dare" else torch.ones(numel, dtype=torch.bool)
        deltas.append(torch.where(keep, x - base, 0.0) / density)
    ref = ref_combine(base, deltas, weights, 1.0, election, election=election)
    assert not out.isfinite().all() and torch.equal(out.isnan(), ref.isnan())
    assert bits_equal(torch.nan_to_num(out, nan=0.5), torch.nan_to_num(ref, nan=0.5))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_della(case):
    n, shape = case
    xs = task_inputs(n, shape, seed=50 + n)
    base, numel, key = xs[0], xs[0].numel(), "text.layers.0.mlp.weight"
    for density, epsilon, election in ((0.5, 0.2, True), (0.3, 0.1, False), (0.4, 0.0, False)):
        params = {"density": density, "epsilon": epsilon, "sign_election": election, "seed": 3}
        out = run_all(build("della", params, base=0), xs, key=key)
        deltas = []
        for i, x in enumerate(xs[1:], start=1):
            d = x - base
            p = della_probs(d, density, epsilon)
            deltas.append(torch.where(uniform01(3, i, key, 0, numel) < p, d, 0.0) / p)
        ref = ref_combine(base, deltas, [1.0] * n, 1.0, election, election=election)
        assert bits_equal(out, ref), (density, epsilon, election)


def test_della_probabilities_follow_rank():
    """Keep probabilities rise with |delta| from density - eps/2 to density + eps/2 (bin mid-ranks)."""
    d = torch.randn(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.01
    p = della_probs(d, 0.5, 0.2)
    order = torch.argsort(d.abs())
    assert bool((p[order][1:] >= p[order][:-1]).all())
    assert 0.4 <= float(p.min()) < 0.401 and 0.599 < float(p.max()) <= 0.6 + 1e-15
    exact = 0.4 + 0.2 * torch.argsort(order).double() / (d.numel() - 1)
    assert float((p - exact).abs().max()) < 0.2 * 0.02  # bin share of a Gaussian: under 2%


def test_dare_masks_differ_between_inputs_and_tensors():
    method = Dare(DareParams(density=0.5), base=0)
    numel = 4096

    def kept(key: str, j: int, i: int, start: int = 0, count: int = numel) -> torch.Tensor:
        state = method.begin(key, numel, 4)
        d = torch.ones(count, dtype=torch.float64)
        method.sparsify(state, j, i, start, d)
        return d != 0

    a, b, c = kept("w1", 0, 1), kept("w1", 1, 2), kept("w2", 0, 1)
    for m in (a, b, c):
        assert 0.45 < float(m.double().mean()) < 0.55
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert float((a == b).double().mean()) < 0.56  # independent, not shifted copies
    assert torch.equal(kept("w1", 0, 1), a)
    assert torch.equal(kept("w1", 0, 1, 1000, 77), a[1000:1077])  # a chunk sees its slice


@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_density_one_without_election_is_task_arithmetic(case):
    n, shape = case
    xs = task_inputs(n, shape, seed=60 + n)
    weights = [0.5 + 0.25 * i for i in range(n)]
    common = {"weights": weights, "lambda": 0.8}
    ta = run_all(build("task_arithmetic", common, base=0), xs)
    ties = Ties(TiesParams(density=1.0, sign_election=False, weights=tuple(weights), lambda_=0.8), base=0)
    dare = Dare(DareParams(density=1.0, weights=tuple(weights), lambda_=0.8, seed=5), base=0)
    della = Della(
        DellaParams(density=1.0, epsilon=0.0, sign_election=False, weights=tuple(weights), lambda_=0.8), base=0
    )
    crumbs = Breadcrumbs(BreadcrumbsParams(beta=0.0, gamma=0.0, weights=tuple(weights), lambda_=0.8), base=0)
    assert ties.tensor_passes == 0 and dare.tensor_passes == 0 and della.tensor_passes == 0
    for method in (ties, dare, della, crumbs):
        assert bits_equal(run_all(method, xs), ta), method.name


# ---------------------------------------------------------------------------------------------
# Statistic methods: slerp, model_stock, geometric_median


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_slerp(case):
    _, shape = case
    a, b = plain_inputs(2, shape, seed=70 + len(shape))
    for t in (0.0, 0.3, 0.5, 1.0):
        out = run_all(Slerp(SlerpParams(t=t)), [a, b])
        ref, _ = ref_slerp(a, b, t)
        assert bits_equal(out, ref), t
    # Nearly parallel: the documented linear fallback.
    b2 = a + a.abs() * 1e-3
    assert bits_equal(run_all(build("slerp", {"alpha": 0.25}), [a, b2]), a * 0.75 + b2 * 0.25)
    # The geometry: between vectors of equal norm, the result is at angle t * theta from a.
    if a.numel() > 100:
        t = 0.3
        b = b * math.sqrt(fsum_dot(a, a) / fsum_dot(b, b))
        out = run(Slerp(SlerpParams(t=t)), [a, b], 1000)[0]

        def angle(u, v):
            return math.acos(fsum_dot(u, v) / math.sqrt(fsum_dot(u, u) * fsum_dot(v, v)))

        assert abs(angle(a, out) - t * angle(a, b)) < 1e-9
        assert abs(angle(out, b) - (1 - t) * angle(a, b)) < 1e-9


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_stock(case):
    n, shape = case
    n = max(n, 2)
    xs = task_inputs(n, shape, seed=80 + n)
    method = ModelStock(base=0)
    out = run_all(method, xs)
    ref, t = ref_model_stock(xs[0], xs[1:])
    assert bits_equal(out, ref)
    state = method.begin("k", xs[0].numel(), len(xs))
    for s in range(0, xs[0].numel(), 1000):
        method.observe(state, 0, s, Reader(xs, s, 1000))
    method.end_pass(state, 0)
    assert state.t == t
    # The base need not be input 0.
    moved = [*xs[1:], xs[0]]
    assert bits_equal(run(ModelStock(base=len(xs) - 1), moved, 1000)[0], ref)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_geometric_median(case):
    n, shape = case
    xs = plain_inputs(n, shape, seed=90 + n)
    xs[0] = xs[0] * 5  # an outlier for the median to resist
    params = GeometricMedianParams(eps=1e-9, maxiter=12, tol=1e-8)
    out = run_all(GeometricMedian(params), xs)
    assert bits_equal(out, ref_weiszfeld(xs, 1e-9, 12, 1e-8, exact=True))
    approx = ref_weiszfeld(xs, 1e-9, 12, 1e-8, exact=False)
    scale = max(float(x.abs().max()) for x in xs)
    assert float((out - approx).abs().max()) <= 10 * n * 1e-8 * scale
    # It descends: the sum of distances is at most the mean's.
    mean = sum(xs) / n

    def cost(z):
        return sum(math.sqrt(fsum_dot(x - z, x - z)) for x in xs)

    assert cost(out) <= cost(mean) * (1 + 1e-12)


def test_geometric_median_stops_early_on_tol():
    xs = plain_inputs(4, (300,), seed=5)
    method = GeometricMedian(GeometricMedianParams(maxiter=500, tol=1e-3))
    _, passes = run(method, xs, 64)
    assert 1 <= passes < 50


# ---------------------------------------------------------------------------------------------
# float32 accumulation: within an ulp of the output dtype (plus the cancellation bound)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = {torch.float16: (11, -24), torch.bfloat16: (8, -133), torch.float32: (24, -149)}[dtype]
    _, e = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), torch.clamp(e.to(torch.int64) - bits[0], min=bits[1]))


def assert_close_ulp(got32: torch.Tensor, ref64: torch.Tensor, scale: torch.Tensor, n_ops: int, out_dtype) -> None:
    got = got32.to(out_dtype).double()
    ref = ref64.to(out_dtype).double()
    bound = ulp(ref64, out_dtype) + n_ops * 2.0**-24 * scale
    assert bool(((got - ref).abs() <= bound).all()), float(((got - ref).abs() - bound).max())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float32_accumulator(out_dtype):
    n, shape = 6, (37, 29)
    xs = plain_inputs(n, shape, seed=3)
    xs32 = [x.float() for x in xs]  # exact: the sources are at most float32
    weights = [0.1 * (i + 1) for i in range(n)]
    scale = sum(x.abs() * w for x, w in zip(xs, weights, strict=True))
    out = run_all(build("weighted_sum", {"weights": weights}), xs32)
    assert out.dtype == torch.float32
    assert_close_ulp(out, ref_weighted_sum(xs, weights), scale, 2 * n, out_dtype)
    out = run_all(build("uniform"), xs32)
    assert_close_ulp(out, sum(xs) / n, sum(x.abs() for x in xs) / n, n + 1, out_dtype)
    out = run_all(Slerp(SlerpParams(t=0.4)), xs32[:2])
    ref, _ = ref_slerp(xs[0], xs[1], 0.4)
    assert_close_ulp(out, ref, xs[0].abs() + xs[1].abs(), 4, out_dtype)
    txs = task_inputs(4, shape, seed=4)
    txs32 = [x.float() for x in txs]
    out = run_all(ModelStock(base=0), txs32)
    ref, _ = ref_model_stock(txs[0], txs[1:])
    assert_close_ulp(out, ref, sum(x.abs() for x in txs), 10, out_dtype)
    out = run_all(build("task_arithmetic", {"weights": [0.5, 1.0, 1.5, 0.25]}, base=0), txs32)
    ref = ref_combine(txs[0], [x - txs[0] for x in txs[1:]], [0.5, 1.0, 1.5, 0.25], 1.0, False, False)
    assert_close_ulp(out, ref, sum(x.abs() for x in txs) * 1.5, 12, out_dtype)
    out = run_all(GeometricMedian(GeometricMedianParams(maxiter=6, tol=0.0)), xs32)
    ref = ref_weiszfeld(xs, 1e-6, 6, 0.0, exact=True)
    assert_close_ulp(out, ref, sum(x.abs() for x in xs), 4 * n, out_dtype)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "dare", "della"])
def test_float32_selections_are_chunking_invariant(name):
    """Selections and masks over float32 deltas: no float64 reference, but bit-identical runs."""
    txs32 = [x.float() for x in task_inputs(4, (37, 29), seed=4)]
    params = {"ties": {"density": 0.3}}.get(name, {})
    assert run_all(build(name, params, base=0), txs32).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# The building blocks: exact sums and the mergeable selection


def test_exact_sum_is_exact_and_order_free():
    rnd = random.Random(1)
    torch.manual_seed(1)
    for trial in range(40):
        n = rnd.choice([1, 3, 100, 3000])
        x = torch.randn(n, dtype=torch.float64) * torch.pow(10.0, torch.empty(n).uniform_(-300, 300).double())
        if trial % 3 == 0:
            x[::2] = 1e-310  # subnormals
        total = ExactSum()
        total.add(x)
        assert Fraction(total.total, 2**1126) == sum(Fraction(v) for v in x.tolist())
        parts = [ExactSum() for _ in range(3)]
        cuts = sorted(rnd.randrange(n + 1) for _ in range(2))
        for p, piece in zip(parts, (x[: cuts[0]], x[cuts[0] : cuts[1]], x[cuts[1] :]), strict=True):
            p.add(piece)
        parts[2].merge(parts[0])
        parts[2].merge(parts[1])
        assert parts[2].value() == total.value()
    big = ExactSum()
    big.add(torch.tensor([1e308, 1e308], dtype=torch.float64))
    assert big.value() == math.inf
    nan = ExactSum()
    nan.add(torch.tensor([math.inf, 1.0], dtype=torch.float64))
    other = ExactSum()
    other.add(torch.tensor([-math.inf], dtype=torch.float64))
    nan.merge(other)
    assert math.isnan(nan.value())


@pytest.fixture(params=["fused", "torch"])
def selection_path(request, monkeypatch):
    """Run a test with the CPU's fused passes (_fused.digit_histogram, and the first pass's
    sample_histogram, counted) and with the torch operations a GPU runs."""
    from astolfo_dist.recipe.library import _fused, _select

    calls = {"digit_histogram": 0, "sample_histogram": 0, "magnitude_bits": 0}
    for module, name in ((_fused, "digit_histogram"), (_fused, "sample_histogram"), (_select, "magnitude_bits")):
        def counted(*args, _kernel=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    if request.param == "torch":
        monkeypatch.setattr(_fused, "supported", lambda *tensors: False)
    yield request.param
    if request.param == "torch":
        assert calls["digit_histogram"] == calls["sample_histogram"] == 0 and calls["magnitude_bits"] > 0
    else:
        assert calls["digit_histogram"] + calls["sample_histogram"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_matches_stats(dtype, selection_path):
    """The mergeable selection keeps exactly what stats.py's sequential selection keeps."""
    rnd = random.Random(2)
    torch.manual_seed(2)
    for _ in range(25):
        numel = rnd.choice([3, 500, COLLECT_CAP + 1, 6000])
        x = torch.randn(numel, dtype=torch.float64)
        kind = rnd.choice(["normal", "zeros", "repeated"])
        if kind == "zeros":
            x[torch.rand(numel) < 0.7] = 0.0
        elif kind == "repeated":
            x = torch.randint(-3, 4, (numel,)).double()
        x = x.to(dtype)
        k = rnd.randrange(numel + 1)
        sel = Selection(numel, k)
        chunk = rnd.choice([7, 1000, numel])
        starts = list(range(0, numel, chunk))
        while not sel.done:
            rnd.shuffle(starts)
            halves = [copy.deepcopy(sel), copy.deepcopy(sel)]
            for s in starts:
                halves[rnd.randrange(2)].feed(x[s : s + chunk], s)
            halves[0].merge(halves[1])
            sel = halves[0]
            sel.end_pass()
        ref = exact_topk_mask(lambda x=x: iter(x.split(1000)), numel, k)
        got = torch.cat([sel.mask(x[s : s + chunk], s) for s in range(0, numel, chunk)])
        assert torch.equal(got, ref(x, 0)), (numel, k, kind)
        assert dataclasses.replace(sel.result, passes=0) == dataclasses.replace(ref.result, passes=0)
        assert sel.result.n_greater + sel.result.n_equal_to_keep == k
        assert sel.result.passes <= 5


@pytest.mark.parametrize("kind", ["float16 grid", "one value"])
def test_a_tie_split_reads_only_the_chunk_holding_the_cut(kind, selection_path):
    """Deltas of float16 checkpoints tie at the threshold; the pass that settles it records
    each chunk's ties, so the index pass needs one chunk, not the tensor, and still keeps
    exactly what stats.py keeps."""
    numel, chunk = 1 << 20, 1 << 16
    gen = torch.Generator().manual_seed(11)
    if kind == "float16 grid":
        a, b = (torch.randn(numel, generator=gen) * 0.05).half(), (torch.randn(numel, generator=gen) * 0.05).half()
        x = a.float() - b.float()
    else:
        x = torch.full((numel,), 0.25)
    k = numel // 5 + 3
    sel = Selection(numel, k, inert_zeros=True, band_cap=0)  # no band: that settles ties in the first pass
    fed = []
    while not sel.done:
        index_stage = sel.stage == "index"
        for s in range(0, numel, chunk):
            if sel.wants(s, chunk):
                fed.append((index_stage, s))
                sel.feed(x[s : s + chunk], s)
        sel.end_pass()
    ref = exact_topk_mask(lambda: iter(x.split(chunk)), numel, k)
    assert dataclasses.replace(sel.result, passes=0) == dataclasses.replace(ref.result, passes=0)
    assert 0 < sel.result.n_equal_to_keep < sel.result.n_equal  # a tie split happened
    assert len({s for index_stage, s in fed if index_stage}) == 1  # one chunk (over one or more passes)
    assert sum(1 for s in range(0, numel, chunk) if sel.skip_length(s) is None) <= 1 or sel.done
    got = torch.cat([sel.mask(x[s : s + chunk], s) for s in range(0, numel, chunk)])
    assert torch.equal(got, ref(x, 0))


@pytest.mark.parametrize("band", [False, True])
def test_ties_tie_split_reads_only_the_chunks_holding_the_cuts(band, monkeypatch):
    """TIES over deltas of float16 checkpoints. Without the first pass's band (as on a GPU):
    two full passes settle the thresholds, and the tie split reads the base and the input
    only where an input's cut lies. With it (the CPU): one pass settles thresholds and ties."""
    from astolfo_dist.recipe.library import _select

    if not band:
        monkeypatch.setattr(_select, "BAND_BUDGET", 0)
    numel, chunk, n = 1 << 20, 1 << 16, 3
    gen = torch.Generator().manual_seed(12)
    xs = [(torch.randn(numel, generator=gen) * 0.05).half().float() for _ in range(n + 1)]
    method = build("ties", {"density": 0.2}, base=0)
    state = method.begin("k", numel, n + 1)
    reads: list[int] = []
    while not method.ready(state):
        reads.append(0)
        for s in range(0, numel, chunk):
            reader = Reader(xs, s, chunk)

            def counted(i: int, reader: Reader = reader) -> torch.Tensor:
                reads[-1] += 1
                return reader(i)

            method.observe(state, len(reads) - 1, s, counted)
        method.end_pass(state, len(reads) - 1)
    full = (n + 1) * numel // chunk
    if band:
        assert reads == [full]
    else:
        assert reads[:2] == [full, full] and len(reads) == 3
        assert 2 <= reads[2] <= 2 * n  # per input: its window's chunk, and the base there
    out = torch.cat([_output(method, state, xs, s, chunk) for s in range(0, numel, chunk)])
    whole, _ = run(build("ties", {"density": 0.2}, base=0), xs, numel)  # one chunk: no window
    assert bits_equal(out, whole)


def topk_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |x|, ties kept in element-index order (-0.0 equal to +0.0, no NaN here):
    a stable sort of the magnitude patterns, the whole tensor at once."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype]
    keys = x.abs().view(ints).long()
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.sort(keys, descending=True, stable=True).indices[:k]] = True
    return mask


def select_in_passes(x: torch.Tensor, k: int, chunk: int, copies: int = 1, *, inert_zeros: bool = False,
                     fed: list[int] | None = None, **options) -> Selection:
    """Selection over x in chunks of `chunk`; each pass split between `copies` copies of the state
    (chunk i to copy i % copies), merged, then ended. With `fed`: how many chunks each pass
    took (the others the selection did not want)."""
    sel = Selection(x.numel(), k, inert_zeros=inert_zeros, **options)
    while not sel.done:
        parts = [copy.deepcopy(sel) for _ in range(copies)]
        if fed is not None:
            fed.append(0)
        for i, s in enumerate(range(0, x.numel(), chunk)):
            if parts[i % copies].wants(s, chunk):
                parts[i % copies].feed(x[s : s + chunk], s)
                if fed is not None:
                    fed[-1] += 1
        for other in parts[1:]:
            parts[0].merge(other)
        sel = parts[0]
        sel.end_pass()
    return sel


def selected(sel: Selection, x: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([sel.mask(x[s : s + chunk], s) for s in range(0, x.numel(), chunk)])


@pytest.mark.parametrize("kind", ["normal", "float16 grid"])
@pytest.mark.parametrize("copies", [1, 2])
def test_the_band_settles_even_deltas_in_one_pass(kind, copies):
    """Where the first chunk predicts the threshold (deltas alike along the tensor), the first
    pass's band holds it and its ties: one statistic pass, the exact selection, ties split in
    index order; with the pass split between two copies, whose bands differ, as well."""
    numel, chunk = 1 << 20, 1 << 16
    gen = torch.Generator().manual_seed(21)
    if kind == "normal":
        x = torch.randn(numel, generator=gen)
    else:
        a, b = (torch.randn(numel, generator=gen) * 0.05).half(), (torch.randn(numel, generator=gen) * 0.05).half()
        x = a.float() - b.float()
    k = numel // 5 + 3
    sel = select_in_passes(x, k, chunk, copies)
    assert sel.result.passes == 1
    assert torch.equal(selected(sel, x, chunk), topk_reference(x, k))
    if kind == "float16 grid":
        assert 0 < sel.result.n_equal_to_keep < sel.result.n_equal  # the band split the ties too


@pytest.mark.parametrize("kind", ["drift", "late shift", "no room"])
def test_a_band_that_misses_costs_a_pass_not_a_wrong_answer(kind):
    """Deltas that grow along the tensor (the first chunk's estimate is low: at the quarter the
    rank has left the band, and the pass stops there, to be repeated without one), deltas that
    jump after the middle (the band misses once the keys above it are more than needed: the
    rest of that pass is skipped too), and a band cap too small for any digit (a histogram pass
    from the first chunk on): the exact selection every time, in the passes and chunks each case
    costs (16 chunks a pass)."""
    numel, chunk = 1 << 20, 1 << 16
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(numel, generator=gen)
    options = {}
    if kind == "drift":
        x *= torch.linspace(1.0, 4.0, numel)
    elif kind == "late shift":
        x[numel // 2 :] *= 3.0
    else:
        options["band_cap"] = 64
    k = numel // 5 + 3
    fed: list[int] = []
    sel = select_in_passes(x, k, chunk, fed=fed, **options)
    assert torch.equal(selected(sel, x, chunk), topk_reference(x, k))
    assert sel.result.passes == len(fed) == {"drift": 3, "late shift": 3, "no room": 2}[kind]
    assert fed[1:] == [16] * (len(fed) - 1)
    if kind == "drift":
        assert fed[0] == 4  # a quarter of the tensor
    elif kind == "late shift":
        assert 8 < fed[0] < 16  # the band missed in the second half, before its end
    else:
        assert fed[0] == 16


def test_inert_zeros_are_kept_whole_whichever_pass_settles_them():
    """TIES's selections never split ties at zero (a zero delta changes nothing): the band's
    ranking keeps them all as the histogram passes do, so the result is the same for any
    chunking, band or not (but for how many passes it took)."""
    numel, k = 40_000, 20_000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(numel, generator=gen)
    x[torch.rand(numel, generator=gen) < 0.9] = 0.0
    results = {(chunk, cap): select_in_passes(x, k, chunk, inert_zeros=True, band_cap=cap).result
               for chunk in (4000, numel) for cap in (None, 0)}
    assert {r.passes for r in results.values()} == {1, 2}  # the band settled some, histograms the others
    assert len({dataclasses.replace(r, passes=0) for r in results.values()}) == 1
    first = next(iter(results.values()))
    assert first.threshold_bits == 0 and first.n_equal_to_keep == first.n_equal and first.cut_index == numel


@settings(max_examples=120, deadline=None, database=None)
@given(
    numel=st.integers(COLLECT_CAP + 1, 40_000),
    density=st.floats(0.0, 1.0),
    chunk=st.integers(64, 20_000),
    copies=st.integers(1, 3),
    kind=st.sampled_from(["normal", "drift", "late shift", "float16 grid", "mostly zero", "float64"]),
    band_cap=st.sampled_from([None, 2000, 64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_band_or_not_the_selection_is_exact(numel, density, chunk, copies, kind, band_cap, seed):
    """Any tensor, k, chunking, split between copies and band room: the whole-tensor answer,
    whichever way the first pass's band went (held the threshold, dropped, overflowed, missed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen, dtype=torch.float64 if kind == "float64" else torch.float32)
    if kind == "drift":
        x *= torch.linspace(1.0, 5.0, numel)
    elif kind == "late shift":
        x[numel // 2 :] *= 4.0
    elif kind == "float16 grid":
        x = (x * 0.05).half().float() - (torch.randn(numel, generator=gen) * 0.05).half().float()
    elif kind == "mostly zero":
        x[torch.rand(numel, generator=gen) < 0.9] = 0.0
    k = round(density * numel)
    sel = select_in_passes(x, k, chunk, copies, band_cap=band_cap)
    assert torch.equal(selected(sel, x, chunk), topk_reference(x, k))
    assert sel.result.n_greater + sel.result.n_equal_to_keep == k


def _output(method: Method, state, xs: list[torch.Tensor], start: int, chunk: int) -> torch.Tensor:
    out = torch.empty(min(chunk, xs[0].numel() - start))
    method.output(state, start, Reader(xs, start, chunk), out)
    return out


# ---------------------------------------------------------------------------------------------
# Memory: states are small and do not grow with the tensor


def state_bytes(obj, seen=None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() + 64
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return 64 + sum(state_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sys.getsizeof(obj) + sum(state_bytes(v, seen) for v in obj)
    return sys.getsizeof(obj)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "della", "slerp", "model_stock", "geometric_median"])
def test_state_stays_small(name):
    params = {"geometric_median": {"maxiter": 3, "tol": 0.0}}.get(name, {})
    n_models = 2 if name == "slerp" else 4
    sizes = []
    for numel in (3000, 1 << 20, 1 << 22):  # the widest histograms from 2**19 elements on
        shape = (numel,)
        xs = plain_inputs(2, shape, 1) if name == "slerp" else task_inputs(n_models - 1, shape, seed=2)
        if name == "geometric_median":
            xs = plain_inputs(n_models, shape, 3)
        method = REGISTRY[name].from_params(params, base=0 if REGISTRY[name].uses_base else None)
        state = method.begin("k", numel, len(xs))
        p, peak = 0, state_bytes(state)
        while not method.ready(state):
            for s in range(0, numel, 1 << 19):
                method.observe(state, p, s, Reader(xs, s, 1 << 19))
                peak = max(peak, state_bytes(state))
            method.end_pass(state, p)
            peak = max(peak, state_bytes(state))
            p += 1
        sizes.append(peak)
    # Histograms, tie records and first-pass bands of all selections of a tensor within their
    # budgets (STATE_BUDGET); collect candidates 16 bytes each.
    assert max(sizes) <= STATE_BUDGET + n_models * 2 * (COLLECT_CAP * 16 + 4096), sizes
    # No growth with numel beyond the widest histograms, but for the first pass's bands (a share
    # of the tensor, within BAND_BUDGET).
    bands = max(0, sizes[2] - sizes[1] - 64 * 1024)
    assert bands <= BAND_BUDGET, sizes


# ---------------------------------------------------------------------------------------------
# Parameters, registry, validation


def test_registry_and_aliases():
    assert set(REGISTRY) == {
        "weighted_sum", "uniform", "add_difference", "task_arithmetic", "ties", "dare", "della",
        "breadcrumbs", "slerp", "model_stock", "geometric_median",
    }  # fmt: skip
    assert build("ties", {"k": 0.4, "lambda": 0.5}, base=0).params == TiesParams(density=0.4, lambda_=0.5)
    assert build("slerp", {"alpha": 0.2}).params.t == 0.2
    assert build("task_arithmetic", {"scale": 2}, base=1).params == TaskArithmeticParams(lambda_=2.0)
    assert build("weighted_sum", {"weights": [1, 2]}).params.weights == (1.0, 2.0)


@pytest.mark.parametrize(
    ("name", "params", "base", "words"),
    [
        ("ties", {"density": 1.5}, 0, ["ties", "density"]),
        ("ties", {"consensus": "mass"}, 0, ["ties", "consensus"]),
        ("dare", {"density": 0.0}, 0, ["dare", "density"]),
        ("dare", {"seed": -1}, 0, ["dare", "seed"]),
        ("della", {"density": 0.9, "epsilon": 0.4}, 0, ["della", "epsilon"]),
        ("breadcrumbs", {"beta": 0.6, "gamma": 0.6}, 0, ["breadcrumbs", "gamma"]),
        ("slerp", {"t": 2}, None, ["slerp", "t"]),
        ("geometric_median", {"maxiter": -1}, None, ["geometric_median", "maxiter"]),
        ("geometric_median", {"eps": 0}, None, ["geometric_median", "eps"]),
        ("task_arithmetic", {"lambda": float("nan")}, 0, ["task_arithmetic", "lambda"]),
        ("task_arithmetic", {"normalize": "yes"}, 0, ["task_arithmetic", "normalize"]),
        ("weighted_sum", {"weights": [1, "a"]}, None, ["weighted_sum", "weights"]),
        ("ties", {"densty": 0.5}, 0, ["ties", "densty"]),
        ("ties", {}, None, ["ties", "base"]),
        ("slerp", {}, 0, ["slerp", "base"]),
        ("nope", {}, None, ["nope"]),
    ],
)
def test_validation_names_method_and_field(name, params, base, words):
    with pytest.raises(UsageError) as err:
        build(name, params, base=base)
    for word in words:
        assert word in str(err.value)


def test_input_counts_are_checked():
    with pytest.raises(UsageError, match="weights"):
        build("task_arithmetic", {"weights": [1.0, 2.0]}, base=0).begin("k", 10, 4)
    with pytest.raises(UsageError, match="exactly 2"):
        build("slerp").begin("k", 10, 3)
    with pytest.raises(UsageError, match="at least 3"):
        ModelStock(base=0).begin("k", 10, 2)
    with pytest.raises(UsageError, match="base index"):
        build("ties", base=5).begin("k", 10, 3)


def test_driver_errors_are_caught():
    xs = task_inputs(2, (50,), seed=1)
    method = Ties(TiesParams(density=0.5), base=0)
    state = method.begin("k", 50, 3)
    method.observe(state, 0, 0, Reader(xs, 0, 25))
    with pytest.raises(ValueError, match="observed 25"):
        method.end_pass(state, 0)
    with pytest.raises(ValueError, match="pass 1"):
        method.observe(state, 1, 25, Reader(xs, 25, 25))
