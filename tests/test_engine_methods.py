"""The method library wired into the engine: `merge --method NAME [--base B] [--set k=v]`
gives the library's whole-tensor result, the same bytes for any chunk size and worker
count, through the CLI's one-line errors. (The library's math against float64 references
is tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import one_pass_read_bytes, sha256, split_base
from safetensors.torch import load_file

from astolfo_dist import merge
from astolfo_dist.cli import main
from astolfo_dist.recipe.library import build

# Divisors that are not powers of two (dare's 0.3, task_arithmetic's 0.7, model_stock's 3,
# uniform's 3): CUDA divides by a Python number as a multiply by its reciprocal, so these pin
# base.divide_ on a GPU (tests/test_cuda.py runs the same cases there).
CASES = [
    ("ties", {"density": 0.3}, True, 4),
    ("dare", {"density": 0.3, "seed": 7}, True, 3),
    ("task_arithmetic", {"lambda": 0.8, "weights": [0.3, 0.4], "normalize": True}, True, 3),
    ("uniform", {}, False, 3),
    ("breadcrumbs", {"beta": 0.1, "gamma": 0.2}, True, 3),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}, True, 3),
    ("model_stock", {}, True, 4),
    ("slerp", {"t": 0.3}, False, 2),
    ("geometric_median", {"eps": 1e-8, "maxiter": 20, "tol": 1e-6}, False, 4),
    ("add_difference", {"alpha": 0.7}, False, 3),
]


def _library_whole_tensor(name, params, paths, base, key, acc_dtype, out_dtype):
    """The library driven over the whole tensor at once (one chunk), as an independent driver."""
    inputs = [load_file(str(p))[key].to(acc_dtype).reshape(-1) for p in paths]
    method = build(name, params, base=base)
    state = method.begin(key, inputs[0].numel(), len(inputs))
    p = 0
    while not method.ready(state):
        method.observe(state, p, 0, lambda i: inputs[i].clone())
        method.end_pass(state, p)
        p += 1
    out = torch.empty_like(inputs[0])
    method.output(state, 0, lambda i: inputs[i].clone(), out)
    return out.to(out_dtype)


@pytest.mark.parametrize("name,params,uses_base,n", CASES, ids=[c[0] for c in CASES])
def test_engine_method_equals_library_and_is_chunk_invariant(sd_models, tmp_path, name, params, uses_base, n):
    paths = sd_models(["F16"] * n, keys=60, scale=16)
    models, base = split_base(paths, uses_base)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge([str(p) for p in models], a, method=name, base=str(base) if base else None, params=params)
    merge([str(p) for p in models], b, method=name, base=str(base) if base else None, params=params,
          chunk_mb=0.002, workers=1, shard_mb=0.05)
    assert sha256(a) == sha256(b)
    merged = load_file(str(a))
    order = [*models, base] if base else models
    base_index = len(models) if base else None
    checked = 0
    for key, got in merged.items():
        if not got.is_floating_point() or key.startswith("cond_stage_model.transformer.text_model.embeddings.pos"):
            continue
        want = _library_whole_tensor(name, params, order, base_index, key, torch.float32, got.dtype)
        assert torch.equal(got.reshape(-1).view(torch.int16), want.view(torch.int16)), key
        checked += 1
    assert checked > 20


def test_method_errors_are_one_line_exit_2(sd_models, tmp_path, capsys):
    paths = [str(p) for p in sd_models(["F16", "F16", "F16"], keys=10)]
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["--method", "nope"], "unknown merge method 'nope'"),
        (["--method", "ties", "--base", paths[2], "--set", "density=1.5"], "density"),
        (["--base", paths[2]], "--base needs --method"),
        (["--method", "ties", "--base", paths[2], "--keys", "union"], "needs every input to hold each key"),
        (["--method", "ties", "--set", "density"], "NAME=VALUE"),
    ]
    for extra, needle in cases:
        code = main(["merge", paths[0], paths[1], "-o", out, "-q", *extra]) if "NAME=VALUE" not in needle else None
        if code is None:
            with pytest.raises(SystemExit) as exc:
                main(["merge", paths[0], paths[1], "-o", out, "-q", *extra])
            assert exc.value.code == 2
            assert needle in capsys.readouterr().err
            continue
        assert code == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (extra, err)
    assert not list(tmp_path.glob("o.safetensors*"))


def test_recipe_in_metadata_records_the_method(sd_models, tmp_path):
    import json

    from safetensors import safe_open

    paths = [str(p) for p in sd_models(["F16", "F16", "F16"], keys=10)]
    out = tmp_path / "o.safetensors"
    merge(paths[:2], out, method="ties", base=paths[2], params={"density": 0.4})
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["astolfo_dist_recipe"])
    assert recipe["method"] == "ties" and recipe["params"] == {"density": 0.4} and recipe["base"] == paths[2]


@pytest.mark.parametrize("name,params,uses_base,n", CASES, ids=[c[0] for c in CASES])
def test_tensor_cache_gives_the_same_bytes_and_reads_each_input_once(sd_models, tmp_path, name, params, uses_base, n):
    """--tensor-cache-mb keeps a tensor's inputs between a method's passes: the same bytes,
    whether every tensor fits, some do or none; with all of them kept, every input byte is
    read once, as by a one-pass method over the same files."""
    paths = [str(p) for p in sd_models(["F16", "BF16", "F32"][:n] + ["F16"] * max(0, n - 3), keys=60, scale=16)]
    models, base = split_base(paths, uses_base)
    runs = {}
    for cache_mb in (0, 0.05, 64):  # none, the small tensors, all
        out = tmp_path / f"c{cache_mb}.safetensors"
        result = merge(models, out, method=name, base=base, params=params, chunk_mb=0.004, workers=2,
                       tensor_cache_mb=cache_mb)
        runs[cache_mb] = (sha256(out), result.read_bytes)
    once = one_pass_read_bytes(models, base, tmp_path / "once.safetensors")
    assert runs[0][0] == runs[0.05][0] == runs[64][0]
    assert runs[64][1] == once
    if build(name, params, base=n - 1 if uses_base else None).tensor_passes:  # one-pass methods read once anyway
        assert runs[0][1] > runs[0.05][1] > runs[64][1]
    else:
        assert runs[0][1] == runs[64][1]


def test_grouped_reads_of_many_mixed_inputs_give_the_per_input_bytes(sd_models, tmp_path, monkeypatch):
    """The worker reads a group's inputs in one call (read.rows: windows of GROUP inputs, a run
    of one dtype per kernel call) and refuses a window holding a source the CPU kernels do not
    widen (float64 into float32: each input read on its own then, as with the tensor cache).
    Eleven task inputs in runs of float16, bfloat16, float64 and float32, TIES both ways: the
    same bytes, and both ways taken."""
    from astolfo_dist import worker

    taken = {"rows": 0, "refused": 0}
    rows = worker._TensorGraph._rows

    def counted(self, *args):
        got = rows(self, *args)
        taken["rows" if got is not None else "refused"] += 1
        return got

    monkeypatch.setattr(worker._TensorGraph, "_rows", counted)
    dtypes = ["F16"] * 3 + ["BF16"] * 2 + ["F16"] * 4 + ["F64", "F32", "F16"]
    paths = [str(p) for p in sd_models(dtypes, keys=12, scale=16)]
    outs = {}
    for cache_mb in (0, 64):  # with every tensor cached, no input is read by rows
        out = tmp_path / f"c{cache_mb}.safetensors"
        merge(paths[:-1], out, method="ties", base=paths[-1], params={"density": 0.3, "consensus": "count"},
              chunk_mb=0.004, workers=2, tensor_cache_mb=cache_mb)
        outs[cache_mb] = sha256(out)
        if cache_mb == 0:
            assert taken["rows"] > 0 and taken["refused"] > 0, taken
    assert outs[0] == outs[64]


def _tie_heavy_models(folder, n_inputs: int) -> list[str]:
    """Small tensors (one chunk each) whose deltas tie at the threshold, are all zero, hold NaN
    and inf, or keep everything; inputs in float16, bfloat16 and float32, two of each in turn
    (so that a kernel call takes several rows), the base last."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {"plain": torch.randn(3000, generator=g), "ties": torch.randn(4096, generator=g),
            "zeros": torch.randn(1500, generator=g), "odd": torch.randn(2000, generator=g),
            "tiny": torch.randn(40, generator=g), "edge": torch.randn(16384, generator=g)}
    paths = []
    for i in range(n_inputs + 1):
        if i == n_inputs:
            sd = {k: v.half() for k, v in base.items()}
        else:
            sd = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
            sd["ties"] = base["ties"] + torch.randint(-3, 4, (4096,), generator=g) * 0.25  # few distinct deltas
            sd["zeros"] = base["zeros"].half().float()  # equal to the base: every delta is zero
            sd["odd"][7] = float("nan")
            sd["odd"][11 + i] = float("inf") if i % 2 else -float("inf")
            sd = {k: v.to([torch.float16, torch.bfloat16, torch.float32][i // 2 % 3]) for k, v in sd.items()}
        path = folder / f"t{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("n_inputs,params,accumulate", [
    (3, {"density": 0.3}, "auto"),
    (3, {"density": 0.01, "consensus": "count", "weights": [0.5, 1.0, 2.0]}, "auto"),
    (11, {"density": 0.7, "lambda": 0.9}, "auto"),  # more task inputs than a kernel group
    (2, {"density": 0.9999}, "auto"),  # every element kept in the smaller tensors
    (4, {"density": 0.4}, "fp64"),  # float64 deltas: int64 keys
])
def test_small_tensors_at_once_give_the_passes_bytes(tmp_path, monkeypatch, n_inputs, params, accumulate):
    """A tensor read as one chunk takes TIES's selection and output in one step
    (SelectingMethod.output_at_once: each input read once, each row's exact top-k from a
    partition): the same bytes as its statistic passes and output pass, ties at the threshold,
    all-zero deltas, NaN and inf and mixed dtypes included, and each input byte read once."""
    from astolfo_dist.recipe.library import _taskvec

    paths = _tie_heavy_models(tmp_path, n_inputs)
    taken = []
    at_once = _taskvec.SelectingMethod.output_at_once

    def counted(self, *args):
        got = at_once(self, *args)
        taken.append(got)
        return got

    monkeypatch.setattr(_taskvec.SelectingMethod, "output_at_once", counted)
    runs = {}
    for limit in ("at once", "passes"):
        if limit == "passes":
            monkeypatch.setattr(_taskvec, "AT_ONCE_MAX", 0)
        out = tmp_path / f"{limit}.safetensors"
        result = merge(paths[:-1], out, method="ties", base=paths[-1], params=params, workers=2,
                       accumulate=accumulate)
        runs[limit] = (sha256(out), result.read_bytes)
    assert taken.count(True) == 6 and taken.count(False) == 6, taken  # all six tensors, then none
    assert runs["at once"][0] == runs["passes"][0]
    assert runs["at once"][1] == one_pass_read_bytes(paths[:-1], paths[-1], tmp_path / "once.safetensors")
    assert runs["passes"][1] > runs["at once"][1]
