"""The merge recipe: a plain, validated, serialisable value.

A recipe is either one method over N models (the weighted sum by default; what `merge`'s
flags build) or a DAG of named method nodes over the models (recipe/graph.py), plus
component replacement and key policies. Its canonical JSON goes into the output's metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError
from ..formats.dtypes import OUTPUT_DTYPES
from .graph import RecipeNode, evaluation_order
from .varying import check_varying, params_for_key, plain

KeyPolicy = Literal["strict", "intersection", "union"]
KEY_POLICIES: tuple[str, ...] = ("strict", "intersection", "union")
DTYPE_CHOICES: tuple[str, ...] = ("keep", *OUTPUT_DTYPES)
ACCUMULATE_CHOICES: tuple[str, ...] = ("auto", "fp32", "fp64")


@dataclass(frozen=True)
class MergeRecipe:
    models: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # None: uniform 1/N
    keys: KeyPolicy = "strict"
    dtype: str = "keep"
    accumulate: str = "auto"
    drop: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()  # (key prefix, donor model)
    method_name: str = ""  # a method of recipe.library; "" = the weighted sum (uniform or --weights)
    params: tuple[tuple[str, object], ...] = ()  # the method's parameters (mergekit / sd-mecha names)
    base: str | None = None  # base model of task-vector methods: an extra, last input
    # Parameters that vary over the model. `blocks` names the key->block map (sd1, sdxl, llm);
    # `per_block` overrides parameters for a block (sd1/sdxl: "IN00"...; llm: "L12"),
    # `gradients` spreads a list of anchor values over an LLM's layers (mergekit-style), and
    # `per_key` overrides by regular expression, applied last and in order.
    blocks: str = ""
    per_block: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    gradients: tuple[tuple[str, tuple[float, ...]], ...] = ()
    per_key: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    # A recipe DAG instead of one method: nodes reading models (by name) and other nodes.
    # `model_names` name the models (default: the model strings themselves); `output` is the
    # node whose value is written (default: the last node listed).
    nodes: tuple[RecipeNode, ...] = ()
    output: str = ""
    model_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("no input models given")
        if self.keys not in KEY_POLICIES:
            raise UsageError(f"--keys must be one of {', '.join(KEY_POLICIES)}, not {self.keys!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {self.dtype!r}")
        if self.accumulate not in ACCUMULATE_CHOICES:
            raise UsageError(f"--accumulate must be one of {', '.join(ACCUMULATE_CHOICES)}, not {self.accumulate!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.models):
                raise UsageError(f"{len(self.weights)} weights given for {len(self.models)} models")
            if not all(math.isfinite(w) for w in self.weights):
                raise UsageError("weights must be finite numbers")
            if sum(self.weights) == 0:
                raise UsageError("weights sum to zero; they are normalised to sum to 1")
        for pattern in self.drop:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"--drop {pattern!r} is not a valid regular expression: {exc}") from None
        for prefix, donor in self.replace:
            if not prefix or not donor:
                raise UsageError(f"--replace needs PREFIX=MODEL, got {prefix!r}={donor!r}")
        check_varying(self.blocks, self.per_block, self.gradients, self.per_key)
        if self.model_names and len(self.model_names) != len(self.models):
            raise UsageError(f"{len(self.model_names)} model names given for {len(self.models)} models")
        if self.nodes:
            if len(set(self.names)) != len(self.names):
                raise UsageError("models: a name is given twice; nodes refer to models by name")
            self._check_graph()
        elif self.model_names or self.output:
            raise UsageError("model names and output name the parts of a recipe DAG: give nodes too")
        if self.method_name:
            from .library import build

            node = self.graph[0]
            build(node.method, dict(node.params), base=node.base_index)  # validates names and values
            if self.keys == "union":
                raise UsageError(f"--method {self.method_name} needs every input to hold each key: "
                                 "use --keys strict or intersection")

    def _check_graph(self) -> None:
        flat = {"method": self.method_name, "weights": self.weights, "params": self.params, "base": self.base,
                "per_block": self.per_block, "gradients": self.gradients, "per_key": self.per_key}
        for field, value in flat.items():
            if value:
                raise UsageError(f"{field}: a recipe with nodes sets it inside a node")
        if self.keys == "union":
            raise UsageError("nodes need every input to hold each key: use keys: strict or intersection")
        self.graph  # noqa: B018 -- validates, naming the node and field

    @property
    def names(self) -> tuple[str, ...]:
        """How nodes refer to the models."""
        return self.model_names or self.models

    def upto(self, node: str) -> MergeRecipe:
        """The recipe whose output is `node`: only the nodes and models that feed it (an
        intermediate model is written only when asked for this way)."""
        if not self.nodes:
            raise UsageError("--node picks a node of a recipe DAG; this recipe has no nodes")
        by_name = {n.name: n for n in self.nodes}
        if node not in by_name:
            raise UsageError(f"--node: {node!r} is not a node ({', '.join(by_name)})")
        feeding: set[str] = set()
        todo = [node]
        while todo:
            name = todo.pop()
            if name not in feeding:
                feeding.add(name)
                todo.extend(by_name[name].args if name in by_name else ())
        kept = [i for i, name in enumerate(self.names) if name in feeding]
        return dataclasses.replace(
            self,
            models=tuple(self.models[i] for i in kept),
            model_names=tuple(self.names[i] for i in kept),
            nodes=tuple(n for n in self.nodes if n.name in feeding),
            output=node,
        )

    @property
    def input_names(self) -> tuple[str, ...]:
        """How the graph refers to `inputs`: the model names, then the base if any."""
        return self.names + ((self.base,) if self.base else ())

    @property
    def output_node(self) -> str:
        return self.output or (self.nodes[-1].name if self.nodes else "")

    @functools.cached_property
    def graph(self) -> tuple[RecipeNode, ...]:
        """The method nodes in evaluation order, the output last: the recipe's DAG, or the one
        node its single method makes; empty for the engine's streaming weighted sum."""
        if self.nodes:
            return evaluation_order(self.nodes, self.names, self.output_node, self.blocks)
        if not self.method_name:
            return ()
        params = tuple(sorted(self.method_params().items()))
        return (RecipeNode("merge", self.method_name, self.models, self.base, params,
                           self.per_block, self.gradients, self.per_key),)

    def params_for(self, key: str, n_layers: int = 0) -> dict[str, object]:
        """The method parameters (weights included) that apply to `key`."""
        return params_for_key(self.method_params(), self.blocks, self.per_block, self.gradients, self.per_key,
                              key, n_layers)

    @property
    def varies(self) -> bool:
        return bool(self.per_block or self.gradients or self.per_key)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The models read for every key: the recipe's models, then the base if any."""
        return self.models + ((self.base,) if self.base else ())

    def method_params(self) -> dict[str, object]:
        params = dict(self.params)
        if self.weights is not None and "weights" not in params:
            params["weights"] = list(self.weights)
        return params

    @property
    def method(self) -> str:
        if self.nodes:
            return "dag"
        if self.method_name:
            return self.method_name
        return "uniform" if self.weights is None else "weighted_sum"

    def normalised_weights(self, present: Sequence[int], key: str = "", n_layers: int = 0) -> tuple[float, ...]:
        """Weights of the inputs in `present` (indices) for `key`, scaled to sum to 1 over them."""
        weights = self.params_for(key, n_layers).get("weights") if self.varies else self.weights
        if weights is not None and (not isinstance(weights, list | tuple) or len(weights) != len(self.models)):
            raise UsageError(f"{key}: weights {weights!r} must be a list of {len(self.models)} numbers")
        raw = [1.0 if weights is None else float(weights[i]) for i in present]
        total = math.fsum(raw)
        if total == 0:
            raise UsageError("the weights of the inputs holding a key sum to zero")
        return tuple(w / total for w in raw)

    def to_dict(self) -> dict:
        graph = {}
        if self.nodes:
            graph = {"nodes": {n.name: n.to_dict() for n in self.graph}, "output": self.output_node}
        return {
            **graph,
            "type": "astolfo-dist",
            "method": self.method,
            # Named models as a list of {name: model}: a mapping would lose their order to sort_keys.
            "models": [{n: m} for n, m in zip(self.model_names, self.models, strict=True)] if self.model_names
            else list(self.models),
            "weights": None if self.weights is None else list(self.weights),
            "keys": self.keys,
            "dtype": self.dtype,
            "accumulate": self.accumulate,
            "drop": list(self.drop),
            "replace": [list(pair) for pair in self.replace],
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params},
            "base": self.base,
            "blocks": self.blocks or None,
            "per_block": {b: plain(p) for b, p in self.per_block},
            "gradients": {k: list(v) for k, v in self.gradients},
            "per_key": [{"pattern": pat, "params": plain(p)} for pat, p in self.per_key],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

