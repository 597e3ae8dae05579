r"""Recipes from files: a YAML recipe, or the canonical recipe a merged file carries in its
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
    blocks: sd1               # sd1 | sdxl | llm: the key -> block map (docs/blocks.md)
    per_block: {IN00: {density: 0.5}, OUT11: {weights: [1, 0, 0]}}
    gradients: {lambda: [0.2, 1.0]}   # llm only: anchors spread over the layers
    per_key: [{pattern: '\.norm', params: {density: 1.0}}]   # last word, in order

or a DAG of method nodes over named models (recipe/graph.py), each node with its own
method, inputs (models or nodes), base, params, per_block, gradients and per_key:

    models: {pool1: a.safetensors, pool2: b.safetensors, ext: c.safetensors}
    blocks: sd1
    nodes:
      pool: {method: uniform, inputs: [pool1, pool2]}
      out: {method: weighted_sum, inputs: [pool, ext], params: {weights: [0.8, 0.2]},
            per_block: {OUT11: {weights: [0.5, 0.5]}}}
    output: out               # default: the last node

Every error names the file and the field (and the node).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import AstolfoError, InputError
from .graph import RecipeNode
from .spec import MergeRecipe

FIELDS = {"models", "method", "base", "params", "weights", "dtype", "keys", "accumulate", "drop", "replace", "type",
          "blocks", "per_block", "gradients", "per_key", "nodes", "output"}
NODE_FIELDS = {"method", "inputs", "base", "params", "per_block", "gradients", "per_key"}


def _strings(source: str, field: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        where, _, name = field.rpartition(": ")
        raise InputError(source, f"{where + ': ' if where else ''}field {name!r} must be a list of strings")
    return tuple(value)


def recipe_from_dict(source: str, data: object) -> MergeRecipe:
    if not isinstance(data, Mapping):
        raise InputError(source, "a recipe must be a mapping of fields")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InputError(source, f"unknown field {unknown[0]!r}; known: {', '.join(sorted(FIELDS - {'type'}))}")
    if "models" not in data:
        raise InputError(source, "field 'models' is required")
    names, models = _models(source, data["models"])
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
    for field in ("method", "base", "dtype", "keys", "accumulate", "output"):
        if field in data and data[field] is not None and not isinstance(data[field], str):
            raise InputError(source, f"field {field!r} must be a string")
    nodes = data.get("nodes") or {}
    if not isinstance(nodes, Mapping) or not all(isinstance(k, str) for k in nodes):
        raise InputError(source, "field 'nodes' must map node names to nodes")
    method = data.get("method") or ""
    if nodes and method == "dag":
        method = ""  # what the canonical form of a DAG says it is
    params, per_block, gradients, per_key = _method_fields(source, "", data)
    if method in ("uniform", "weighted_sum") and not params:
        method = ""  # the engine's own streaming weighted sum
    try:
        return MergeRecipe(
            models=models,
            model_names=names if nodes else (),
            weights=None if weights is None else tuple(float(w) for w in weights),
            keys=data.get("keys", "strict"),
            dtype=data.get("dtype", "keep"),
            accumulate=data.get("accumulate", "auto"),
            drop=_strings(source, "drop", data.get("drop") or []),
            replace=pairs,
            method_name=method,
            params=params,
            base=data.get("base"),
            blocks=data.get("blocks") or "",
            per_block=per_block,
            gradients=gradients,
            per_key=per_key,
            nodes=tuple(_node(source, name, node) for name, node in nodes.items()),
            output=data.get("output") or "",
        )
    except AstolfoError as exc:
        raise InputError(source, str(exc)) from None


def _models(source: str, value: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, models) from a list of models, a mapping name -> model, or a list of one-entry
    mappings (the canonical form, which keeps the order); names are () for a plain list."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) and len(v) == 1 for v in value):
        value = [next(iter(v.items())) for v in value]
    elif isinstance(value, Mapping):
        value = list(value.items())
    else:
        return (), _strings(source, "models", value)
    pairs = [(k, v) for k, v in value if isinstance(k, str) and isinstance(v, str)]
    if len(pairs) != len(value):
        raise InputError(source, "field 'models' must name models with strings")
    return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)


def _node(source: str, name: str, data: object) -> RecipeNode:
    where = f"node {name!r}: "
    if not isinstance(data, Mapping):
        raise InputError(source, f"{where}must be a mapping of fields")
    unknown = sorted(set(data) - NODE_FIELDS)
    if unknown:
        raise InputError(source, f"{where}unknown field {unknown[0]!r}; known: {', '.join(sorted(NODE_FIELDS))}")
    for field in ("method", "inputs"):
        if field not in data:
            raise InputError(source, f"{where}field {field!r} is required")
    for field in ("method", "base"):
        if data.get(field) is not None and not isinstance(data[field], str):
            raise InputError(source, f"{where}field {field!r} must be a string")
    params, per_block, gradients, per_key = _method_fields(source, where, data)
    return RecipeNode(name, data["method"], _strings(source, f"{where}inputs", data["inputs"]), data.get("base"),
                      params, per_block, gradients, per_key)


def _method_fields(source: str, where: str, data: Mapping) -> tuple:
    """params, per_block, gradients and per_key of the recipe (where="") or of a node."""
    params = data.get("params") or {}
    if not isinstance(params, Mapping):
        raise InputError(source, f"{where}field 'params' must be a mapping of parameter names to values")
    per_block = data.get("per_block") or {}
    if not isinstance(per_block, Mapping) or not all(isinstance(v, Mapping) for v in per_block.values()):
        raise InputError(source, f"{where}field 'per_block' must map block names to parameter mappings")
    gradients = data.get("gradients") or {}
    if not isinstance(gradients, Mapping) or not all(
        isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in gradients.values()
    ):
        raise InputError(source, f"{where}field 'gradients' must map parameter names to lists of numbers")
    per_key = data.get("per_key") or []
    if not isinstance(per_key, list) or not all(
        isinstance(e, Mapping) and isinstance(e.get("pattern"), str) and isinstance(e.get("params", {}), Mapping)
        for e in per_key
    ):
        raise InputError(source, f"{where}field 'per_key' must be a list of {{pattern: REGEX, params: {{...}}}}")
    return (
        _params(params),
        tuple((str(b), _params(p)) for b, p in per_block.items()),
        tuple((str(k), tuple(float(x) for x in v)) for k, v in gradients.items()),
        tuple((e["pattern"], _params(e.get("params", {}))) for e in per_key),
    )


def _params(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((str(k), _hashable(v)) for k, v in mapping.items()))


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
        data = {k: v for k, v in data.items() if v not in (None, [], {}, "") or k == "models"}
        return recipe_from_dict(path, data)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(path, f"is not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(path, data)
