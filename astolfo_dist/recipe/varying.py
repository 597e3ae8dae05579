"""Parameters that vary over the model: per block, along LLM layers, per key pattern.

One set of rules serves a whole single-method recipe and each node of a recipe DAG alike:
`blocks` names the key -> block map (sd1, sdxl, llm); `per_block` overrides parameters for
a block (sd1/sdxl: "IN00"...; llm: "L12"); `gradients` spreads a list of anchor values over
an LLM's layers (mergekit-style); `per_key` overrides by regular expression, applied last
and in order.
"""

from __future__ import annotations

import math
import re

from ..errors import UsageError

Overrides = tuple[tuple[str, object], ...]
PerBlock = tuple[tuple[str, Overrides], ...]
Gradients = tuple[tuple[str, tuple[float, ...]], ...]
PerKey = tuple[tuple[str, Overrides], ...]


def check_varying(blocks: str, per_block: PerBlock, gradients: Gradients, per_key: PerKey, where: str = "") -> None:
    """UsageError for rules that cannot apply; `where` prefixes the message (a node's name)."""
    from .blocks import LAYOUTS, layout_blocks

    def fail(message: str) -> None:
        raise UsageError(f"{where}{message}")

    if (per_block or gradients) and blocks not in LAYOUTS:
        fail(f"per_block and gradients need blocks: one of {', '.join(LAYOUTS)}")
    if gradients and blocks != "llm":
        fail("gradients spread values over LLM layers: they need blocks: llm")
    if blocks and blocks != "llm":
        known = set(layout_blocks(blocks))
        for block, _params in per_block:
            if block not in known:
                fail(f"per_block: {block!r} is not a {blocks} block ({', '.join(sorted(known))})")
    for pattern, _params in per_key:
        try:
            re.compile(pattern)
        except re.error as exc:
            fail(f"per_key: {pattern!r} is not a valid regular expression: {exc}")
    for name, values in gradients:
        if not values or not all(math.isfinite(v) for v in values):
            fail(f"gradients: {name!r} needs a list of numbers")


def params_for_key(
    params: dict[str, object],
    blocks: str,
    per_block: PerBlock,
    gradients: Gradients,
    per_key: PerKey,
    key: str,
    n_layers: int = 0,
) -> dict[str, object]:
    """`params` with the rules that apply to `key` laid over them, in order: block, gradient, key."""
    params = dict(params)
    if blocks:
        from .blocks import block_of, interpolate_gradient

        block = block_of(blocks, key)
        name = f"L{block}" if isinstance(block, int) else block
        for selector, overrides in per_block:
            if selector == name:
                params.update(overrides)
        if isinstance(block, int) and n_layers:
            for param, anchors in gradients:
                params[param] = interpolate_gradient(anchors, n_layers)[block]
    for pattern, overrides in per_key:
        if re.search(pattern, key):
            params.update(overrides)
    return params


def plain(params: Overrides) -> dict[str, object]:
    """Overrides as JSON-ready values (tuples back to lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params}
