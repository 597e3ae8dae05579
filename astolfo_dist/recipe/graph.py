"""Recipe DAGs: named method nodes whose inputs are models or other nodes.

    models: {a: a.safetensors, b: b.safetensors, c: c.safetensors, x: x.safetensors}
    nodes:
      pool: {method: uniform, inputs: [a, b, c]}
      extended: {method: ties, inputs: [x], base: pool, params: {density: 0.3}}
      out: {method: weighted_sum, inputs: [pool, extended], params: {weights: [0.7, 0.3]}}
    output: out

The engine evaluates the whole graph per key and per chunk, fused: a node's value for a
chunk is computed from its inputs' values for the same chunk when something reads it, and
no intermediate model is written. A node with statistic passes (TIES thresholds, SLERP
angles...) runs them over its inputs' values, so a node's state is settled before any node
that reads it starts. Nodes are kept in evaluation order (a depth-first walk from the
output through each node's inputs in the order listed: every node after what it reads),
and only nodes that feed the output are allowed: a node or model that feeds nothing is a
mistake in the recipe, reported, not silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .varying import Gradients, Overrides, PerBlock, PerKey, check_varying, params_for_key, plain


@dataclass(frozen=True)
class RecipeNode:
    """One method applied to models and/or other nodes, with its own (varying) parameters."""

    name: str
    method: str
    inputs: tuple[str, ...]
    base: str | None = None  # task-vector methods: the model or node the vectors are taken against
    params: Overrides = ()
    per_block: PerBlock = ()
    gradients: Gradients = ()
    per_key: PerKey = ()

    @property
    def args(self) -> tuple[str, ...]:
        """What the method reads, in order: the inputs, then the base if any."""
        return self.inputs + ((self.base,) if self.base else ())

    @property
    def base_index(self) -> int | None:
        return len(self.inputs) if self.base else None

    @property
    def varies(self) -> bool:
        return bool(self.per_block or self.gradients or self.per_key)

    def params_for(self, blocks: str, key: str, n_layers: int = 0) -> dict[str, object]:
        return params_for_key(dict(self.params), blocks, self.per_block, self.gradients, self.per_key, key, n_layers)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "inputs": list(self.inputs),
            "base": self.base,
            "params": plain(self.params),
            "per_block": {b: plain(p) for b, p in self.per_block},
            "gradients": {k: list(v) for k, v in self.gradients},
            "per_key": [{"pattern": pat, "params": plain(p)} for pat, p in self.per_key],
        }


def evaluation_order(
    nodes: tuple[RecipeNode, ...], model_names: tuple[str, ...], output: str, blocks: str
) -> tuple[RecipeNode, ...]:
    """The nodes, validated, inputs before readers, ending with `output`; UsageError naming
    the node and field otherwise."""
    from .library import build

    if not nodes:
        raise UsageError("nodes: a recipe DAG needs at least one node")
    models = set(model_names)
    by_name: dict[str, RecipeNode] = {}
    for node in nodes:
        where = f"node {node.name!r}: "
        if not node.name or not isinstance(node.name, str):
            raise UsageError(f"nodes: a node needs a name, got {node.name!r}")
        if node.name in by_name:
            raise UsageError(f"{where}defined twice")
        if node.name in models:
            raise UsageError(f"{where}has the name of a model; names of models and nodes must differ")
        by_name[node.name] = node
    for node in nodes:
        where = f"node {node.name!r}: "
        if not node.inputs:
            raise UsageError(f"{where}field 'inputs' is empty")
        for field, refs in (("inputs", node.inputs), ("base", (node.base,) if node.base else ())):
            for ref in refs:
                if ref not in models and ref not in by_name:
                    raise UsageError(f"{where}field {field!r}: {ref!r} is neither a model nor a node")
                if ref == node.name:
                    raise UsageError(f"{where}field {field!r}: a node cannot read itself")
        if len(set(node.args)) != len(node.args):
            raise UsageError(f"{where}field 'inputs': an input is listed twice (or is also the base)")
        try:
            method = build(node.method, dict(node.params), base=node.base_index)
            method.check_inputs(len(node.args))
            check_varying(blocks, node.per_block, node.gradients, node.per_key)
        except UsageError as exc:
            raise UsageError(f"{where}{exc}") from None
    if output not in by_name:
        raise UsageError(f"output: {output!r} is not a node")

    order: list[RecipeNode] = []
    state: dict[str, str] = {}  # name -> "open" while its inputs are visited, "done" after

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = " -> ".join((*path[path.index(name):], name))
            raise UsageError(f"node {name!r}: field 'inputs': cycle {cycle}")
        state[name] = "open"
        for ref in by_name[name].args:
            if ref in by_name:
                visit(ref, (*path, name))
        state[name] = "done"
        order.append(by_name[name])

    visit(output, ())
    unused = [n.name for n in nodes if n.name not in state]
    if unused:
        raise UsageError(f"node {unused[0]!r}: does not feed the output node {output!r}")
    read = {ref for node in order for ref in node.args}
    for name in model_names:
        if name not in read:
            raise UsageError(f"model {name!r}: is not an input of any node")
    return tuple(order)
