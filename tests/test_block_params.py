"""Parameters that vary per block (SD1/SDXL), per LLM layer (gradients) and per key pattern."""

from __future__ import annotations

import pytest
import torch
from conftest import sha256
from safetensors.torch import load_file, save_file

from astolfo_dist.errors import InputError, UsageError
from astolfo_dist.merge import run_recipe
from astolfo_dist.recipe import MergeRecipe
from astolfo_dist.recipe.blocks import sd1_block
from astolfo_dist.recipe.files import load_recipe


def test_sd1_per_block_weights_and_per_key_override(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "F16"], scale=32)]
    recipe = MergeRecipe(models=tuple(paths), blocks="sd1",
                         per_block=(("IN00", (("weights", (1.0, 0.0)),)), ("OUT11", (("weights", (0.0, 1.0)),))),
                         per_key=((r"middle_block\.0\.", (("weights", (1.0, 0.0)),)),))
    out = tmp_path / "o.safetensors"
    run_recipe(recipe, out)
    merged, a, b = (load_file(str(p)) for p in (out, *paths))
    seen = set()
    for key, got in merged.items():
        if not got.is_floating_point():
            continue
        block = sd1_block(key)
        if "middle_block.0." in key or block == "IN00":
            assert torch.equal(got, a[key]), key
            seen.add("a")
        elif block == "OUT11":
            assert torch.equal(got, b[key]), key
            seen.add("b")
        else:
            want = ((a[key].double() + b[key].double()) / 2).to(got.dtype)
            assert torch.equal(got, want), key
            seen.add("mean")
    assert seen == {"a", "b", "mean"}


def test_llm_gradient_spreads_a_parameter_over_layers(tmp_path):
    g = torch.Generator().manual_seed(0)
    def model(path):
        sd = {f"model.layers.{i}.mlp.weight": torch.randn(8, 8, generator=g) for i in range(4)}
        sd["model.embed_tokens.weight"] = torch.randn(16, 8, generator=g)
        save_file(sd, str(path))
        return str(path)
    base, x, y = (model(tmp_path / f"{n}.safetensors") for n in "bxy")
    recipe = MergeRecipe(models=(x, y), base=base, method_name="task_arithmetic", blocks="llm",
                         gradients=(("lambda_", (0.0, 1.0)),), dtype="fp32")
    out = tmp_path / "o.safetensors"
    run_recipe(recipe, out)
    merged, sb, sx, sy = (load_file(str(p)) for p in (out, base, x, y))
    for i, lam in enumerate([0.0, 1 / 3, 2 / 3, 1.0]):
        key = f"model.layers.{i}.mlp.weight"
        want = sb[key].double() + lam * ((sx[key].double() - sb[key].double()) + (sy[key].double() - sb[key].double()))
        assert torch.allclose(merged[key].double(), want, rtol=0, atol=1e-5), (key, lam)
    assert torch.equal(merged["model.layers.0.mlp.weight"], sb["model.layers.0.mlp.weight"])


def test_yaml_per_block_round_trips_through_metadata(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "F16"], scale=32)]
    text = ("models: [" + ", ".join(paths) + "]\nblocks: sd1\nper_block: {IN00: {weights: [1, 0]}}\n"
            "per_key: [{pattern: 'time_embed', params: {weights: [0, 1]}}]\n")
    (tmp_path / "r.yaml").write_text(text)
    first = tmp_path / "first.safetensors"
    run_recipe(load_recipe(str(tmp_path / "r.yaml")), first)
    again = tmp_path / "again.safetensors"
    run_recipe(load_recipe(str(first)), again)
    assert sha256(first) == sha256(again)


@pytest.mark.parametrize("kwargs,needle", [
    ({"per_block": (("IN99", ()),), "blocks": "sd1"}, "not a sd1 block"),
    ({"per_block": (("IN00", ()),)}, "need blocks"),
    ({"gradients": (("lambda_", (0.0, 1.0)),), "blocks": "sd1"}, "need blocks: llm"),
    ({"per_key": (("(", ()),)}, "not a valid regular expression"),
])
def test_bad_varying_parameters(kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        MergeRecipe(models=("a", "b"), **kwargs)


def test_per_block_weights_of_the_wrong_length(sd_models, tmp_path):
    paths = [str(p) for p in sd_models(["F16", "F16"], keys=30)]
    recipe = MergeRecipe(models=tuple(paths), blocks="sd1", per_block=(("BASE", (("weights", (1.0,)),)),))
    with pytest.raises((UsageError, InputError), match="must be a list of 2 numbers"):
        run_recipe(recipe, tmp_path / "o.safetensors")
