"""Recipes from files: a YAML recipe, or the canonical recipe a merged file carries in its
metadata (so `astolfo-dist run merged.safetensors -o again.safetensors` re-runs it).

    models: [a.safetensors, b.safetensors, c.safetensors]
    method: ties              # optional: uniform by default, weighted_sum with weights
    base: base.safetensors    # task-vector methods
    params: {density: 0.2}
    weights: [1, 1, 2]
    dtype: fp16               # keep | fp16 | bf16 | fp32 | fp64
    keys: strict              # strict | intersection | union
    drop: ['^model_ema\\.']
    replace: {'cond_stage_model.': donor.safetensors}

Every error names the file and the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import AstolfoError, InputError
from .spec import MergeRecipe

FIELDS = {"models", "method", "base", "params", "weights", "dtype", "keys", "accumulate", "drop", "replace", "type"}


def _strings(source: str, field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(source, f"field {field!r} must be a list of strings")
    return tuple(value)


def recipe_from_dict(source: str, data: object) -> MergeRecipe:
    if not isinstance(data, Mapping):
        raise InputError(source, "a recipe must be a mapping of fields")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InputError(source, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS - {'type'}))}")
    if "models" not in data:
        raise InputError(source, "field 'models' is required")
    models = _strings(source, "models", data["models"])
    weights = data.get("weights")
    if weights is not None and (
        not isinstance(weights, list) or not all(isinstance(w, int | float) and not isinstance(w, bool)
                                                 for w in weights)
    ):
        raise InputError(source, "field 'weights' must be a list of numbers")
    replace = data.get("replace") or {}
    if isinstance(replace, list):
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in replace):
            raise InputError(source, "field 'replace' must map key prefixes to donor models")
        pairs = tuple((p[0], p[1]) for p in replace)
    elif isinstance(replace, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in replace.items()):
        pairs = tuple(replace.items())
    else:
        raise InputError(source, "field 'replace' must map key prefixes to donor models")
    params = data.get("params") or {}
    if not isinstance(params, Mapping):
        raise InputError(source, "field 'params' must be a mapping of parameter names to values")
    for field in ("method", "base", "dtype", "keys", "accumulate"):
        if field in data and data[field] is not None and not isinstance(data[field], str):
            raise InputError(source, f"field {field!r} must be a string")
    method = data.get("method") or ""
    if method in ("uniform", "weighted_sum") and not params:
        method = ""  # the engine's own streaming weighted sum
    try:
        return MergeRecipe(
            models=models,
            weights=None if weights is None else tuple(float(w) for w in weights),
            keys=data.get("keys", "strict"),
            dtype=data.get("dtype", "keep"),
            accumulate=data.get("accumulate", "auto"),
            drop=_strings(source, "drop", data.get("drop") or []),
            replace=pairs,
            method_name=method,
            params=tuple(sorted((str(k), _hashable(v)) for k, v in params.items())),
            base=data.get("base"),
        )
    except AstolfoError as exc:
        raise InputError(source, str(exc)) from None


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def load_recipe(path: str) -> MergeRecipe:
    """A YAML recipe file, or a merged .safetensors file's own recipe."""
    file = Path(path)
    if not file.exists():
        raise InputError(path, "no such file")
    if file.suffix == ".safetensors":
        from ..formats.header import read_header
        from ..formats.readers import open_reader

        reader = open_reader(path)
        try:
            metadata = read_header(reader).metadata
        finally:
            reader.close()
        if "astolfo_dist_recipe" not in metadata:
            raise InputError(path, "holds no astolfo-dist recipe in its metadata")
        try:
            data = json.loads(metadata["astolfo_dist_recipe"])
        except ValueError:
            raise InputError(path, "its astolfo_dist_recipe metadata is not JSON") from None
        data = {k: v for k, v in data.items() if v not in (None, [], {}) or k == "models"}
        return recipe_from_dict(path, data)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(path, data)
