"""The merge recipe: a plain, validated, serialisable value.

Today it is one weighted sum over N models with component replacement and key policies;
its canonical JSON goes into the output's metadata.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError
from ..formats.dtypes import OUTPUT_DTYPES

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
        self._check_varying()
        if self.method_name:
            from .library import build

            build(self.method_name, self.method_params(), base=self.base_index)  # validates names and values
            if self.keys == "union":
                raise UsageError(f"--method {self.method_name} needs every input to hold each key: "
                                 "use --keys strict or intersection")

    def _check_varying(self) -> None:
        from .blocks import LAYOUTS, layout_blocks

        if (self.per_block or self.gradients) and self.blocks not in LAYOUTS:
            raise UsageError(f"per_block and gradients need blocks: one of {', '.join(LAYOUTS)}")
        if self.gradients and self.blocks != "llm":
            raise UsageError("gradients spread values over LLM layers: they need blocks: llm")
        if self.blocks and self.blocks != "llm":
            known = set(layout_blocks(self.blocks))
            for block, _params in self.per_block:
                if block not in known:
                    raise UsageError(f"per_block: {block!r} is not a {self.blocks} block ({', '.join(sorted(known))})")
        for pattern, _params in self.per_key:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"per_key: {pattern!r} is not a valid regular expression: {exc}") from None
        for name, values in self.gradients:
            if not values or not all(math.isfinite(v) for v in values):
                raise UsageError(f"gradients: {name!r} needs a list of numbers")

    def params_for(self, key: str, n_layers: int = 0) -> dict[str, object]:
        """The method parameters (weights included) that apply to `key`."""
        params = self.method_params()
        if self.blocks:
            from .blocks import block_of, interpolate_gradient

            block = block_of(self.blocks, key)
            name = f"L{block}" if isinstance(block, int) else block
            for selector, overrides in self.per_block:
                if selector == name:
                    params.update(overrides)
            if isinstance(block, int) and n_layers:
                for param, anchors in self.gradients:
                    params[param] = interpolate_gradient(anchors, n_layers)[block]
        for pattern, overrides in self.per_key:
            if re.search(pattern, key):
                params.update(overrides)
        return params

    @property
    def varies(self) -> bool:
        return bool(self.per_block or self.gradients or self.per_key)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The models read for every key: the recipe's models, then the base if any."""
        return self.models + ((self.base,) if self.base else ())

    @property
    def base_index(self) -> int | None:
        return len(self.models) if self.base else None

    def method_params(self) -> dict[str, object]:
        params = dict(self.params)
        if self.weights is not None and "weights" not in params:
            params["weights"] = list(self.weights)
        return params

    @property
    def method(self) -> str:
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
        return {
            "type": "astolfo-dist",
            "method": self.method,
            "models": list(self.models),
            "weights": None if self.weights is None else list(self.weights),
            "keys": self.keys,
            "dtype": self.dtype,
            "accumulate": self.accumulate,
            "drop": list(self.drop),
            "replace": [list(pair) for pair in self.replace],
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params},
            "base": self.base,
            "blocks": self.blocks or None,
            "per_block": {b: _plain(p) for b, p in self.per_block},
            "gradients": {k: list(v) for k, v in self.gradients},
            "per_key": [{"pattern": pat, "params": _plain(p)} for pat, p in self.per_key],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _plain(params: tuple[tuple[str, object], ...]) -> dict[str, object]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params}
