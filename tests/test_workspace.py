"""The methods' scratch workspace: buffers are reused, scoped, and steady-state method calls
allocate nothing chunk-sized (the allocator would keep what such temporaries free)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from astolfo_dist.recipe.library import REGISTRY, build
from astolfo_dist.recipe.workspace import Workspace


def whole_tensor(method, xs: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Every statistic pass and the output over the whole tensors as one chunk."""
    state = method.begin("k", xs[0].numel(), len(xs))
    p = 0
    while not method.ready(state):
        method.observe(state, p, 0, lambda i: xs[i])
        method.end_pass(state, p)
        p += 1
    method.output(state, 0, lambda i: xs[i], out)
    return out


def test_buffer_is_reused_and_grows_only_when_needed():
    ws = Workspace()
    a = ws.buffer("x", torch.float32, 100, "cpu")
    assert a.shape == (100,)
    b = ws.buffer("x", torch.float32, 60, "cpu")
    assert b.data_ptr() == a.data_ptr()  # same memory, shorter view
    c = ws.buffer("x", torch.float32, 1000, "cpu")
    assert c.numel() == 1000
    assert ws.buffer("x", torch.float32, 10, "cpu").data_ptr() == c.data_ptr()
    # Another tag or dtype is another buffer.
    assert ws.buffer("y", torch.float32, 10, "cpu").data_ptr() != c.data_ptr()
    assert ws.buffer("x", torch.float64, 10, "cpu").data_ptr() != c.data_ptr()
    assert ws.like("x", torch.zeros(5, dtype=torch.float64)).dtype == torch.float64


def test_capacity_allocates_once():
    ws = Workspace(capacity=4096)
    a = ws.buffer("x", torch.int64, 10, "cpu")
    assert ws.nbytes() == 4096 * 8
    assert ws.buffer("x", torch.int64, 4096, "cpu").data_ptr() == a.data_ptr()
    assert ws.buffer("x", torch.int64, 5000, "cpu").numel() == 5000  # beyond capacity: grows


def test_exact_grows_to_what_is_asked():
    ws = Workspace(exact=True)
    a = ws.buffer("x", torch.int64, 300, "cpu")
    assert ws.nbytes() == 300 * 8  # not rounded up to 512
    assert ws.buffer("x", torch.int64, 200, "cpu").data_ptr() == a.data_ptr()
    assert ws.buffer("x", torch.int64, 301, "cpu").numel() == 301 and ws.nbytes() == 301 * 8
    assert ws.scope("s").exact and pickle.loads(pickle.dumps(ws)).exact


def test_scopes_share_storage_but_not_tags():
    ws = Workspace()
    one, two = ws.scope("one"), ws.scope("two")
    a, b = one.buffer("t", torch.float32, 8, "cpu"), two.buffer("t", torch.float32, 8, "cpu")
    assert a.data_ptr() != b.data_ptr()
    assert one.buffer("t", torch.float32, 8, "cpu").data_ptr() == a.data_ptr()
    assert one.scope("inner").buffer("t", torch.float32, 8, "cpu").data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert ws.nbytes() == one.nbytes() == 3 * 8 * 4  # one set of buffers, seen through prefixes


def test_copies_arrive_empty():
    ws = Workspace(capacity=16)
    ws.buffer("x", torch.float32, 4, "cpu")
    for other in (pickle.loads(pickle.dumps(ws)), copy.deepcopy(ws)):
        assert other.nbytes() == 0 and other.capacity == 16


# DARE and DELLA draw their masks in `sparsify` (recipe/rng.py), which still allocates.
STEADY = ["ties", "breadcrumbs", "task_arithmetic", "slerp", "model_stock", "geometric_median", "weighted_sum",
          "uniform", "add_difference"]
PARAMS = {"ties": {"consensus": "count"}, "breadcrumbs": {"sign_election": True}, "slerp": {"t": 0.3},
          "geometric_median": {"maxiter": 2, "tol": 0.0}}


@pytest.mark.parametrize("name", STEADY)
def test_steady_state_allocates_nothing_chunk_sized(name, monkeypatch):
    from astolfo_dist.recipe.library import _select

    # The first pass's band is per-tensor state, as the histograms are, allocated once per
    # selection and bounded by BAND_BUDGET (test_methods.py::test_state_stays_small); at this
    # small size it is a good share of a chunk, so it is off here.
    monkeypatch.setattr(_select, "BAND_BUDGET", 0)
    cls = REGISTRY[name]
    n_inputs = {"slerp": 2, "add_difference": 3}.get(name, 5)
    numel = 1 << 16
    torch.manual_seed(0)
    xs = [torch.randn(numel) for _ in range(n_inputs)]
    method = build(name, PARAMS.get(name, {}), base=n_inputs - 1 if cls.uses_base else None)
    method.workspace = Workspace(capacity=numel)

    def merge(out: torch.Tensor) -> torch.Tensor:
        return whole_tensor(method, xs, out)

    first = merge(torch.empty(numel))  # fills the workspace
    second = torch.empty(numel)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        merge(second)
    assert torch.equal(first, second)
    biggest = max((e.self_cpu_memory_usage, e.name) for e in prof.events())
    assert biggest[0] < numel, f"{name}: {biggest[1]} kept {biggest[0]} bytes (a bool chunk is {numel})"


@pytest.mark.parametrize("kind", ["normal", "zeros", "repeated"])
def test_selection_with_a_workspace_selects_the_same(kind):
    """Every stage of the exact selection (histograms, prefix filter, collect, tie indices)
    through workspace buffers, chunk by chunk, against the same selection allocating."""
    from astolfo_dist.recipe.library._select import COLLECT_CAP, Selection

    torch.manual_seed(3)
    for numel in (700, COLLECT_CAP + 1, 20000):
        x = torch.randn(numel)
        if kind == "zeros":
            x[torch.rand(numel) < 0.7] = 0.0
        elif kind == "repeated":
            x = torch.randint(-3, 4, (numel,)).float()  # heavy ties: the index stage runs
        for k in (1, numel // 3, numel - 1):
            plain, reused = Selection(numel, k), Selection(numel, k)
            ws = Workspace(capacity=4096)
            while not plain.done:
                for s in range(0, numel, 4096):
                    plain.feed(x[s : s + 4096], s)
                    reused.feed(x[s : s + 4096], s, ws)
                plain.end_pass()
                reused.end_pass()
            assert reused.done and reused.result == plain.result
            for s in range(0, numel, 4096):
                out = ws.buffer("test.mask", torch.bool, min(4096, numel - s), "cpu")
                got = reused.mask(x[s : s + 4096], s, out=out, workspace=ws)
                assert torch.equal(got, plain.mask(x[s : s + 4096], s))


SCRATCH_PARAMS = [
    ("task_arithmetic", {}), ("task_arithmetic", {"sign_election": True, "consensus": "count"}),
    ("ties", {}), ("ties", {"normalize": False}), ("dare", {"sign_election": True}), ("della", {"sign_election": True}),
    ("breadcrumbs", {"sign_election": True}), ("slerp", {"t": 0.3}), ("model_stock", {}),
    ("geometric_median", {"maxiter": 3, "tol": 0.0}), ("weighted_sum", {}), ("uniform", {}), ("add_difference", {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "zeros", "ties"])
@pytest.mark.parametrize("name,params", SCRATCH_PARAMS, ids=[f"{n}-{len(p)}" for n, p in SCRATCH_PARAMS])
def test_workspace_stays_within_the_declared_scratch(name, params, kind, dtype):
    """The memory budget reserves `scratch_chunks` chunk buffers per node: the bound must hold."""
    cls = REGISTRY[name]
    n_inputs = {"slerp": 2, "add_difference": 3}.get(name, 9)
    numel = 1 << 14
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(numel, generator=gen, dtype=dtype) for _ in range(n_inputs)]
    if kind == "ties":  # a few distinct deltas: thousands tie at the threshold (the index stage)
        xs = [torch.randint(-3, 4, (numel,), generator=gen).to(dtype) * 2**-7 for _ in range(n_inputs)]
    if kind == "zeros":
        for x in xs[:-1]:
            x[torch.rand(numel, generator=gen) < 0.6] = 0.0
    method = build(name, params, base=n_inputs - 1 if cls.uses_base else None)
    method.workspace = Workspace(capacity=numel)
    whole_tensor(method, xs, torch.empty(numel, dtype=dtype))
    used = method.workspace.nbytes() / (numel * dtype.itemsize)
    assert used <= cls.scratch_chunks, f"{name}: {used:.2f} chunks of scratch, declares {cls.scratch_chunks}"


def selection_results(state) -> list:
    return [sel.result for sels in state.selections for sel in sels]


@pytest.mark.parametrize("name", ["ties", "breadcrumbs"])
def test_lent_state_workspace_is_reused_across_tensors_and_gives_the_same_selections(name):
    """With a state workspace lent (as the worker does, one tensor at a time), the selections'
    histograms and bands are taken from it and reused from tensor to tensor: the same results
    as a method that allocates its state per pass, and no new buffer after the first tensors."""
    gen = torch.Generator().manual_seed(7)
    params = {"density": 0.3} if name == "ties" else {"beta": 0.05, "gamma": 0.6}
    lent = Workspace(exact=True)
    pooled, plain = build(name, params, base=0), build(name, params, base=0)
    pooled.state_workspace = lent.scope("0")
    sizes = []
    for numel in (3000, 70000, 70000, 5000):
        xs = [torch.randn(numel, generator=gen) for _ in range(4)]
        states = []
        for method in (pooled, plain):
            state = method.begin("k", numel, len(xs))
            p = 0
            while not method.ready(state):
                for start in range(0, numel, 1 << 14):
                    chunk = [x[start : start + (1 << 14)] for x in xs]
                    method.observe(state, p, start, lambda i, chunk=chunk: chunk[i])
                method.end_pass(state, p)
                p += 1
            states.append(state)
        assert selection_results(states[0]) == selection_results(states[1])
        sizes.append(lent.nbytes())
    assert sizes[0] > 0 and sizes[2] == sizes[1] and sizes[3] == sizes[2]  # reused, not grown again


def test_a_method_of_its_own_keeps_several_states_apart():
    """One TIES instance, two tensors' states alive at once, their passes interleaved chunk by
    chunk: each gets the selections it gets alone (a method used on its own allocates its state
    per pass; only the worker, one tensor at a time, lends a state workspace)."""
    gen = torch.Generator().manual_seed(3)
    numel = 1 << 17
    tensors = {key: [torch.randn(numel, generator=gen) * (1 + j) for j in range(3)] for key in ("a", "b")}

    def settle(method, keys):
        states = {key: method.begin(key, numel, 3) for key in keys}
        p = 0
        while not all(method.ready(s) for s in states.values()):
            for start in range(0, numel, 1 << 15):
                for key, state in states.items():
                    if not method.ready(state):
                        xs = tensors[key]
                        method.observe(state, p, start, lambda i, xs=xs, start=start: xs[i][start : start + (1 << 15)])
            for state in states.values():
                if not method.ready(state):
                    method.end_pass(state, p)
            p += 1
        return {key: selection_results(state) for key, state in states.items()}

    together = settle(build("ties", {"density": 0.2}, base=0), ("a", "b"))
    for key in ("a", "b"):
        assert together[key] == settle(build("ties", {"density": 0.2}, base=0), (key,))[key]
