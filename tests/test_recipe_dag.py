"""Recipe DAGs: a node's input may be another node; the whole graph is evaluated per chunk,
fused. Checked against float64 whole-tensor math written here, across chunk sizes and
workers, and through the CLI's one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import sha256
from safetensors import safe_open
from safetensors.torch import load_file
from test_methods import ceil_fraction, ref_combine, top_by_magnitude

from astolfo_dist.cli import main
from astolfo_dist.errors import InputError
from astolfo_dist.merge import run_recipe
from astolfo_dist.recipe.files import load_recipe


def write_recipe(path, models: dict[str, str], nodes: str, extra: str = ""):
    text = "models:\n" + "".join(f"  {name}: {p}\n" for name, p in models.items()) + "nodes:\n" + nodes + extra
    path.write_text(text)
    return path


def float_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}


def run_dag(sd_models, tmp_path, models: dict[str, str], nodes: str, extra: str, keys: int):
    """Make one checkpoint per entry of `models` (name -> dtype), run the recipe through the
    CLI; return the output's float tensors and the inputs' state dicts (in `models` order)."""
    paths = [str(p) for p in sd_models(list(models.values()), keys=keys)]
    recipe = write_recipe(tmp_path / "r.yaml", dict(zip(models, paths, strict=True)), nodes, extra)
    out = tmp_path / "out.safetensors"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    return float_tensors(out), [load_file(p) for p in paths]


def test_two_stage_weighted_dag_equals_float64_math(sd_models, tmp_path):
    """'uniform of the baseline pool, then weighted into the extended models last'."""
    got, ins = run_dag(sd_models, tmp_path, {"a": "F16", "b": "F16", "c": "BF16", "x": "F16", "y": "F32"}, (
        "  pool: {method: uniform, inputs: [a, b, c]}\n"
        "  out: {method: weighted_sum, inputs: [pool, x, y], params: {weights: [0.5, 0.3, 0.2]}}\n"
    ), "dtype: fp32\n", keys=60)
    checked = 0
    for key, value in got.items():
        x = [sd[key].to(torch.float64) for sd in ins]
        pool = (x[0] + x[1] + x[2]) / 3
        want = (pool * 0.5 + x[3] * 0.3 + x[4] * 0.2).to(torch.float32)  # fp32 output: float64 accumulator
        assert torch.equal(value, want), key
        checked += 1
    assert checked > 20


def test_ties_on_a_node_base_equals_float64_reference(sd_models, tmp_path):
    """A node with statistic passes (TIES thresholds) whose base is another node."""
    got, ins = run_dag(sd_models, tmp_path, dict.fromkeys(["a", "b", "x", "y", "z"], "F16"), (
        "  pool: {method: uniform, inputs: [a, b]}\n"
        "  ext: {method: ties, inputs: [x, y, z], base: pool, params: {density: 0.3}}\n"
    ), "accumulate: fp64\ndtype: fp32\n", keys=40)
    checked = 0
    for key, value in got.items():
        x = [sd[key].to(torch.float64).reshape(-1) for sd in ins]
        base = (x[0] + x[1]) / 2
        deltas = []
        for xi in x[2:]:
            d = xi - base
            deltas.append(torch.where(top_by_magnitude(d, ceil_fraction(d.numel(), 0.3)), d, 0.0))
        want = ref_combine(base, deltas, [1.0] * 3, 1.0, True, True).to(torch.float32)
        assert torch.equal(value.reshape(-1), want), key
        checked += 1
    assert checked > 20


def test_dag_bytes_do_not_depend_on_chunks_or_workers_and_rerun_from_metadata(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "BF16", "F16", "F16", "F16"], keys=50)]
    names = dict(zip(["a", "b", "c", "d", "base"], paths, strict=True))
    recipe_path = write_recipe(tmp_path / "r.yaml", names, (
        "  pool: {method: uniform, inputs: [a, b]}\n"
        "  sparse: {method: dare, inputs: [c, d], base: base, params: {density: 0.6, seed: 5}}\n"
        "  trimmed: {method: ties, inputs: [pool, sparse], base: base, params: {density: 0.5},\n"
        "            per_block: {OUT11: {density: 0.9}}}\n"
        "  out: {method: slerp, inputs: [trimmed, a], params: {t: 0.25}}\n"
    ), "blocks: sd1\ndtype: fp16\n")
    recipe = load_recipe(str(recipe_path))
    first = tmp_path / "first.safetensors"
    second = tmp_path / "second.safetensors"
    run_recipe(recipe, first)
    run_recipe(recipe, second, chunk_mb=0.003, workers=1, shard_mb=0.05)
    assert sha256(first) == sha256(second)
    again = tmp_path / "again.safetensors"
    assert main(["run", str(first), "-o", str(again), "-q"]) == 0
    assert sha256(again) == sha256(first)
    with safe_open(str(first), "pt") as f:
        meta = f.metadata()
    assert '"nodes"' in meta["astolfo_dist_recipe"] and '"output":"out"' in meta["astolfo_dist_recipe"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == [
        "again.safetensors", "first.safetensors", "second.safetensors"]  # no intermediate model written


NODES_OK = "  pool: {method: uniform, inputs: [a, b]}\n"


@pytest.mark.parametrize(
    "nodes,extra,needle",
    [
        ("  p: {method: uniform, inputs: [a, q]}\n  q: {method: uniform, inputs: [p, b]}\n", "",
         "node 'q': field 'inputs': cycle q -> p -> q"),
        ("  p: {method: uniform, inputs: [a, nope]}\n", "", "node 'p': field 'inputs': 'nope' is neither"),
        ("  p: {method: ties, inputs: [a], base: zzz}\n", "", "node 'p': field 'base': 'zzz' is neither"),
        ("  p: {method: ties, inputs: [a], base: b, params: {density: 2}}\n", "",
         "node 'p': ties: parameter 'density'"),
        ("  p: {method: slerp, inputs: [a]}\n  q: {method: uniform, inputs: [p, b]}\n", "",
         "node 'p': slerp: needs exactly 2 input models"),
        (NODES_OK + "  q: {method: uniform, inputs: [a, b]}\n", "output: pool\n",
         "node 'q': does not feed the output node 'pool'"),
        ("  p: {method: uniform, inputs: [a]}\n", "", "model 'b': is not an input of any node"),
        (NODES_OK, "output: nowhere\n", "output: 'nowhere' is not a node"),
        (NODES_OK, "method: ties\n", "method: a recipe with nodes sets it inside a node"),
        (NODES_OK, "keys: union\n", "keys: strict or intersection"),
        ("  a: {method: uniform, inputs: [a, b]}\n", "", "node 'a': has the name of a model"),
        ("  p: {method: uniform, inputs: [a, b], wieghts: [1, 2]}\n", "", "node 'p': unknown field 'wieghts'"),
        ("  p: {method: uniform}\n", "", "node 'p': field 'inputs' is required"),
        ("  p: {method: uniform, inputs: a}\n", "", "node 'p': field 'inputs' must be a list of strings"),
        ("  p: {method: uniform, inputs: [a, b], per_block: {IN99: {}}}\n", "blocks: sd1\n",
         "node 'p': per_block: 'IN99' is not a sd1 block"),
    ],
)
def test_bad_dags_name_the_file_node_and_field(tmp_path, nodes, extra, needle):
    recipe = write_recipe(tmp_path / "bad.yaml", {"a": "a.safetensors", "b": "b.safetensors"}, nodes, extra)
    with pytest.raises(InputError, match=needle) as exc:
        load_recipe(str(recipe))
    assert str(recipe) in str(exc.value)


def test_bad_dag_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "bad.yaml", {"a": "a.safetensors", "b": "b.safetensors"},
                          "  p: {method: uniform, inputs: [a, q]}\n  q: {method: uniform, inputs: [p, b]}\n")
    out = tmp_path / "out.safetensors"
    assert main(["run", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cycle" in err and str(recipe) in err
    assert not out.exists()


def test_run_node_writes_an_intermediate_only_when_asked(sd_models, tmp_path, capsys):
    paths = [str(p) for p in sd_models(["F16", "F16", "F16"], keys=30)]
    recipe = write_recipe(tmp_path / "r.yaml", dict(zip(["a", "b", "x"], paths, strict=True)), (
        "  pool: {method: uniform, inputs: [a, b]}\n"
        "  out: {method: weighted_sum, inputs: [pool, x], params: {weights: [0.5, 0.5]}}\n"
    ), "dtype: fp32\n")
    pool = tmp_path / "pool.safetensors"
    assert main(["run", str(recipe), "--node", "pool", "-o", str(pool), "-q"]) == 0
    ins = [load_file(p) for p in paths]
    for key, value in float_tensors(pool).items():
        want = ((ins[0][key].to(torch.float64) + ins[1][key].to(torch.float64)) / 2).to(torch.float32)
        assert torch.equal(value, want), key
    assert main(["run", str(recipe), "--node", "nope", "-o", str(tmp_path / "n.safetensors")]) == 2
    assert "--node: 'nope' is not a node" in capsys.readouterr().err
