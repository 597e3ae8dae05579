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
        if self.method_name:
            from .library import build

            build(self.method_name, self.method_params(), base=self.base_index)  # validates names and values
            if self.keys == "union":
                raise UsageError(f"--method {self.method_name} needs every input to hold each key: "
                                 "use --keys strict or intersection")

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

    def normalised_weights(self, present: Sequence[int]) -> tuple[float, ...]:
        """Weights of the inputs in `present` (indices), scaled to sum to 1 over them."""
        raw = [1.0 if self.weights is None else self.weights[i] for i in present]
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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
