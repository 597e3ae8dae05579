"""The merge-method library: one module per method, one interface (base.Method).

REGISTRY maps a recipe's method name to its class; `build(name, params, base=...)` makes
an instance from a plain mapping of parameters (YAML), accepting mergekit / sd-mecha
spellings where they exist (e.g. `lambda`, `k`, `alpha`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import UsageError
from .add_difference import AddDifference
from .base import Method, Params, Read, State
from .breadcrumbs import Breadcrumbs
from .dare import Dare
from .della import Della
from .geometric_median import GeometricMedian
from .model_stock import ModelStock
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .uniform import Uniform
from .weighted_sum import WeightedSum

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        WeightedSum,
        Uniform,
        AddDifference,
        TaskArithmetic,
        Ties,
        Dare,
        Della,
        Breadcrumbs,
        Slerp,
        ModelStock,
        GeometricMedian,
    )
}


def build(name: str, params: Mapping[str, Any] | None = None, *, base: int | None = None) -> Method:
    """An instance of method `name` from plain parameters; UsageError for unknown names or values."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise UsageError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return cls.from_params(params, base=base)


__all__ = ["REGISTRY", "Method", "Params", "Read", "State", "build"]
