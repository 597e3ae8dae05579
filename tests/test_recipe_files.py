"""`astolfo-dist run`: YAML recipes, and re-running the recipe a merged file carries."""

from __future__ import annotations

import pytest
from conftest import sha256

from astolfo_dist import merge
from astolfo_dist.cli import main
from astolfo_dist.errors import InputError
from astolfo_dist.recipe.files import load_recipe


def test_yaml_recipe_equals_the_flags(sd_models, tmp_path, capsys):
    paths = [str(p) for p in sd_models(["F16", "F16", "BF16", "F16"], keys=80)]
    flags = tmp_path / "flags.safetensors"
    merge(paths[:3], flags, method="ties", base=paths[3], params={"density": 0.4}, dtype="fp16",
          drop=["^model_ema"], replace=[("cond_stage_model.", paths[3])])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "models:\n" + "".join(f"  - {p}\n" for p in paths[:3])
        + f"method: ties\nbase: {paths[3]}\nparams: {{density: 0.4}}\ndtype: fp16\n"
        + "drop: ['^model_ema']\n" + f"replace: {{'cond_stage_model.': {paths[3]}}}\n"
    )
    out = tmp_path / "yaml.safetensors"
    assert main(["run", str(recipe), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sha256(out) == sha256(flags)


@pytest.mark.parametrize("kwargs", [{}, {"weights": [3, 1]}, {"method": "slerp", "params": {"t": 0.25}}])
def test_rerun_from_a_merged_files_metadata_gives_the_same_bytes(sd_models, tmp_path, kwargs):
    paths = [str(p) for p in sd_models(["F16", "BF16"], keys=80)]
    first = tmp_path / "first.safetensors"
    merge(paths, first, **kwargs)
    again = tmp_path / "again.safetensors"
    assert main(["run", str(first), "-o", str(again), "-q"]) == 0
    assert sha256(again) == sha256(first)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("models: a.safetensors\n", "'models' must be a list of strings"),
        ("models: [a.safetensors]\nmethdo: ties\n", "unknown field 'methdo'"),
        ("method: ties\n", "'models' is required"),
        ("models: [a, b]\nweights: [1, x]\n", "'weights' must be a list of numbers"),
        ("models: [a, b]\nmethod: ties\nparams: {density: 3}\n", "density"),
        ("models: [a, b\n", "is not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_recipes_name_the_file_and_field(tmp_path, text, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(InputError, match=needle) as exc:
        load_recipe(str(recipe))
    assert str(recipe) in str(exc.value)


def test_run_errors_exit_2(tmp_path, sd_models, capsys):
    paths = [str(p) for p in sd_models(["F16"], keys=5)]
    assert main(["run", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    assert main(["run", paths[0], "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "holds no astolfo-dist recipe" in capsys.readouterr().err
