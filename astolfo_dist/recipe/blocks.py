"""Block-weight maps: which merge block (SD) or layer (LLM) a tensor key belongs to.

Per-block weights give every key one block and take that block's weight. Tools disagree on
the keys that sit outside the numbered UNet blocks, so this module settles them once (the
same table is in docs/blocks.md; tests/test_blocks.py holds a golden record of it):

Stable Diffusion, LDM single-file keys (UNet under ``model.diffusion_model.``):

    key ("..." = model.diffusion_model.)            sd1              sdxl
    ...input_blocks.N.                              IN00..IN11       IN00..IN08
    ...middle_block.                                M00              M00
    ...output_blocks.N.                             OUT00..OUT11     OUT00..OUT08
    ...time_embed.                                  BASE             BASE
    ...label_emb. (SDXL size/crop embedding)        BASE             BASE
    ...out. (final norm + conv)                     BASE             BASE
    first_stage_model. (VAE)                        BASE             VAE
    cond_stage_model. / conditioner.embedders.N.    BASE             BASE
    anything else (alphas_cumprod, betas, ...)      BASE             BASE

Why: BASE means "everything that is not a numbered UNet block", the supermerger-style
convention most block-weight presets are written for. Some tools instead group time_embed
with IN00 or ``out`` with OUT11; here both follow BASE. SDXL block lists commonly carry a
separate VAE entry, so the SDXL VAE gets its own block; the SD1 list (BASE + 25 UNet
blocks, 26 values) has none, so the SD1 VAE follows BASE.

``None`` means the key cannot belong to that layout: a UNet block index out of range
(``input_blocks.12`` under ``sd1``, ``input_blocks.9`` under ``sdxl``) or an unknown part
under ``model.diffusion_model.``. Callers should refuse such a layout rather than guess.

LLMs (Hugging Face keys): ``llm_layer`` gives the decoder layer index, ``None`` for
embeddings, the final norm, ``lm_head`` and anything else outside the layer stack.
``interpolate_gradient`` spreads a mergekit-style gradient (a list of anchor values) over
the layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SD1_BLOCKS: tuple[str, ...] = (
    "BASE",
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
)
SDXL_BLOCKS: tuple[str, ...] = (
    "BASE",
    *(f"IN{i:02d}" for i in range(9)),
    "M00",
    *(f"OUT{i:02d}" for i in range(9)),
    "VAE",
)

_UNET = "model.diffusion_model."
_UNET_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
# UNet parts outside the numbered blocks: all of them follow BASE (see the table above).
_UNET_BASE_PARTS = ("time_embed.", "label_emb.", "out.")
_VAE = "first_stage_model."

# Decoder-layer stacks of the common Hugging Face families; the first group is the index.
_LLM_LAYER = re.compile(
    r"^(?:model\.layers"  # Llama, Mistral, Mixtral, Qwen2, Gemma, Phi-3
    r"|model\.decoder\.layers"  # OPT
    r"|transformer\.h"  # GPT-2, GPT-J, Falcon, BLOOM
    r"|gpt_neox\.layers"  # GPT-NeoX, Pythia
    r")\.(\d+)\."
)

LAYOUTS: tuple[str, ...] = ("sd1", "sdxl", "llm")


def _unet_block(key: str, n_blocks: int) -> str | None:
    """Block of a key under model.diffusion_model. for a UNet with `n_blocks` input blocks."""
    rest = key[len(_UNET) :]
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith(_UNET_BASE_PARTS):
        return "BASE"
    m = _UNET_BLOCK.match(rest)
    if m is None:
        return None  # an unknown UNet part: not this layout
    index = int(m.group(2))
    if index >= n_blocks:
        return None  # e.g. input_blocks.9 is SD1, not SDXL
    return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{index:02d}"


def sd1_block(key: str) -> str | None:
    """SD1.x/SD2.x block of an LDM single-file key: BASE, IN00..IN11, M00, OUT00..OUT11."""
    if key.startswith(_UNET):
        return _unet_block(key, 12)
    return "BASE"  # text encoder, VAE (SD1 has no VAE block), schedule buffers, the rest


def sdxl_block(key: str) -> str | None:
    """SDXL block of an LDM single-file key: BASE, IN00..IN08, M00, OUT00..OUT08, VAE."""
    if key.startswith(_UNET):
        return _unet_block(key, 9)
    if key.startswith(_VAE):
        return "VAE"
    return "BASE"  # both text encoders (conditioner.embedders.N.) and the rest


def llm_layer(key: str) -> int | None:
    """Decoder layer index of a Hugging Face LLM key; None outside the layer stack."""
    m = _LLM_LAYER.match(key)
    return int(m.group(1)) if m else None


def interpolate_gradient(values: Sequence[float], n_layers: int) -> list[float]:
    """Spread anchor `values` evenly from layer 0 to layer n_layers-1, linear in between.

    k anchors sit at layers 0, (n-1)/(k-1), ..., n-1; a single value is constant. The anchor
    position of a layer is computed in integers, so a layer that falls on an anchor gets the
    anchor's value exactly.
    """
    if not values:
        raise ValueError("a gradient needs at least one value")
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    vals = [float(v) for v in values]
    k = len(vals)
    if k == 1 or n_layers == 1:
        return [vals[0]] * n_layers
    out = []
    for i in range(n_layers):
        # Anchor coordinate t = i * (k-1) / (n-1) = lo + rem / (n-1).
        lo, rem = divmod(i * (k - 1), n_layers - 1)
        if rem == 0:
            out.append(vals[lo])
        else:
            a, b = vals[lo], vals[lo + 1]
            out.append(a + (b - a) * (rem / (n_layers - 1)))
    return out


def layout_blocks(layout: str) -> tuple[str, ...]:
    """The block names of an SD layout, in the order block-weight lists are written."""
    if layout == "sd1":
        return SD1_BLOCKS
    if layout == "sdxl":
        return SDXL_BLOCKS
    raise ValueError(f"layout {layout!r} has no named blocks; known: sd1, sdxl")


def block_of(layout: str, key: str) -> str | int | None:
    """Block of `key` in `layout`: a block name for "sd1"/"sdxl", a layer index for "llm"."""
    if layout == "sd1":
        return sd1_block(key)
    if layout == "sdxl":
        return sdxl_block(key)
    if layout == "llm":
        return llm_layer(key)
    raise ValueError(f"unknown block layout {layout!r}; known: {', '.join(LAYOUTS)}")
