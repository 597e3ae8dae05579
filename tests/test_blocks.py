"""Block maps: a golden record over the real SD1.5 and SDXL layouts, and the LLM gradient."""

from __future__ import annotations

from collections import Counter

import pytest

from astolfo_dist.recipe.blocks import (
    SD1_BLOCKS,
    SDXL_BLOCKS,
    block_of,
    interpolate_gradient,
    layout_blocks,
    llm_layer,
    sd1_block,
    sdxl_block,
)
from astolfo_dist.synthetic import load_layout

# Golden record: keys per block over the shipped layouts. A change in the mapping must fail
# here and be a deliberate edit of these literals (and of docs/blocks.md).
SD15_COUNTS = {
    "BASE": 465,  # 197 text encoder + 248 VAE + 12 schedule buffers + 4 time_embed + 4 out
    "IN00": 2, "IN01": 36, "IN02": 36, "IN03": 2, "IN04": 38, "IN05": 36,
    "IN06": 2, "IN07": 38, "IN08": 36, "IN09": 2, "IN10": 10, "IN11": 10,
    "M00": 46,
    "OUT00": 12, "OUT01": 12, "OUT02": 14, "OUT03": 38, "OUT04": 38, "OUT05": 40,
    "OUT06": 38, "OUT07": 38, "OUT08": 40, "OUT09": 38, "OUT10": 38, "OUT11": 38,
}  # fmt: skip
SDXL_COUNTS = {
    "BASE": 599,  # 587 text encoders + 4 time_embed + 4 label_emb + 4 out
    "IN00": 2, "IN01": 10, "IN02": 10, "IN03": 2, "IN04": 58, "IN05": 56, "IN06": 2, "IN07": 218, "IN08": 216,
    "M00": 226,
    "OUT00": 218, "OUT01": 218, "OUT02": 220, "OUT03": 58, "OUT04": 58, "OUT05": 60, "OUT06": 12, "OUT07": 12,
    "OUT08": 12,
    "VAE": 248,
}  # fmt: skip


def _counts(layout: str, layout_file: str) -> Counter:
    keys = [k for k, _, _ in load_layout(layout_file)]
    assert len(keys) == len(set(keys))
    return Counter(block_of(layout, k) for k in keys)


@pytest.mark.parametrize(
    ("layout", "layout_file", "golden", "names"),
    [("sd1", "sd15", SD15_COUNTS, SD1_BLOCKS), ("sdxl", "sdxl", SDXL_COUNTS, SDXL_BLOCKS)],
)
def test_golden_block_counts(layout: str, layout_file: str, golden: dict[str, int], names: tuple[str, ...]) -> None:
    counts = _counts(layout, layout_file)
    assert None not in counts, "every key of a real checkpoint must get a block"
    assert set(counts) == set(names) == set(layout_blocks(layout))
    assert dict(counts) == golden
    assert sum(counts.values()) == len(load_layout(layout_file))


def test_documented_block_lists() -> None:
    # SD1: BASE + the 25 UNet blocks (the 26-value supermerger list); SDXL: BASE + 19 UNet blocks + VAE.
    assert len(SD1_BLOCKS) == 26 and len(set(SD1_BLOCKS)) == 26
    assert SD1_BLOCKS[0] == "BASE" and SD1_BLOCKS[12] == "IN11"
    assert SD1_BLOCKS[13] == "M00" and SD1_BLOCKS[-1] == "OUT11"
    assert len(SDXL_BLOCKS) == 21 and len(set(SDXL_BLOCKS)) == 21
    assert SDXL_BLOCKS[9] == "IN08" and SDXL_BLOCKS[10] == "M00" and SDXL_BLOCKS[-2:] == ("OUT08", "VAE")


SD1_SPOT = {
    "model.diffusion_model.input_blocks.0.0.weight": "IN00",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "IN01",
    "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": "IN11",
    "model.diffusion_model.middle_block.1.proj_in.weight": "M00",
    "model.diffusion_model.output_blocks.0.0.in_layers.0.weight": "OUT00",
    "model.diffusion_model.output_blocks.11.1.proj_out.bias": "OUT11",
    "model.diffusion_model.time_embed.0.weight": "BASE",
    "model.diffusion_model.out.2.weight": "BASE",
    "model.diffusion_model.out.0.bias": "BASE",
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "BASE",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": "BASE",
    "first_stage_model.decoder.conv_out.weight": "BASE",
    "first_stage_model.quant_conv.bias": "BASE",
    "alphas_cumprod": "BASE",
    "sqrt_recipm1_alphas_cumprod": "BASE",
}
SDXL_SPOT = {
    "model.diffusion_model.input_blocks.0.0.bias": "IN00",
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": "IN08",
    "model.diffusion_model.middle_block.1.transformer_blocks.5.attn2.to_k.weight": "M00",
    "model.diffusion_model.output_blocks.2.2.conv.weight": "OUT02",
    "model.diffusion_model.output_blocks.8.0.skip_connection.bias": "OUT08",
    "model.diffusion_model.label_emb.0.0.weight": "BASE",
    "model.diffusion_model.time_embed.2.bias": "BASE",
    "model.diffusion_model.out.0.weight": "BASE",
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": "BASE",
    "conditioner.embedders.1.model.text_projection": "BASE",
    "first_stage_model.encoder.down.0.block.1.conv1.weight": "VAE",
    "first_stage_model.post_quant_conv.weight": "VAE",
}


@pytest.mark.parametrize(
    ("layout_file", "fn", "spot"), [("sd15", sd1_block, SD1_SPOT), ("sdxl", sdxl_block, SDXL_SPOT)]
)
def test_spot_checks(layout_file: str, fn, spot: dict[str, str]) -> None:
    present = {k for k, _, _ in load_layout(layout_file)}
    for key, block in spot.items():
        assert key in present, f"spot-check key {key} is not in the {layout_file} layout"
        assert fn(key) == block, key


def test_keys_outside_the_layout() -> None:
    # Block indices past the layout's range and unknown UNet parts have no block.
    assert sd1_block("model.diffusion_model.input_blocks.12.0.weight") is None
    assert sdxl_block("model.diffusion_model.input_blocks.9.0.weight") is None
    assert sdxl_block("model.diffusion_model.output_blocks.11.1.proj_out.bias") is None
    assert sd1_block("model.diffusion_model.mystery.weight") is None
    # SD1-only keys under SDXL, and other leftovers, fall to BASE (or VAE).
    assert sdxl_block("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight") == "BASE"
    assert sd1_block("model_ema.decay") == "BASE"
    assert sd1_block("model.diffusion_model.label_emb.0.0.weight") == "BASE"
    # The prefix must match exactly, not as a substring.
    assert sd1_block("xmodel.diffusion_model.input_blocks.1.0.weight") == "BASE"
    assert sd1_block("model.diffusion_model.input_blocks.1x.0.weight") is None


def test_llm_layer() -> None:
    assert llm_layer("model.layers.0.self_attn.q_proj.weight") == 0
    assert llm_layer("model.layers.31.mlp.down_proj.weight") == 31
    assert llm_layer("model.layers.7.input_layernorm.weight") == 7
    assert llm_layer("transformer.h.11.attn.c_attn.weight") == 11
    assert llm_layer("gpt_neox.layers.3.attention.dense.bias") == 3
    assert llm_layer("model.decoder.layers.5.fc1.weight") == 5
    for key in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "transformer.wte.weight",
        "model.layers.weight",
        "model.layers.x.weight",
        "foo.model.layers.1.weight",
    ):
        assert llm_layer(key) is None, key
    assert block_of("llm", "model.layers.12.mlp.up_proj.weight") == 12
    assert block_of("sdxl", "first_stage_model.decoder.conv_in.bias") == "VAE"
    assert block_of("sd1", "first_stage_model.decoder.conv_in.bias") == "BASE"
    with pytest.raises(ValueError, match="unknown block layout"):
        block_of("sd3", "x")
    with pytest.raises(ValueError):
        layout_blocks("llm")


@pytest.mark.parametrize(
    ("values", "n", "expected"),
    [
        ([0.0, 1.0], 5, [0.0, 0.25, 0.5, 0.75, 1.0]),
        ([1.0, 0.0, 1.0], 5, [1.0, 0.5, 0.0, 0.5, 1.0]),
        # anchors at layers 0, 1.5, 3: layer 1 is 2/3 of the way to 1.0, layer 2 a third of the way to 0.5
        ([0.0, 1.0, 0.5], 4, [0.0, 2 / 3, 1.0 - 0.5 / 3, 0.5]),
        ([0.3], 4, [0.3, 0.3, 0.3, 0.3]),
        ([0.2, 0.8], 1, [0.2]),
        ([0.0, 1.0, 2.0, 3.0, 4.0], 3, [0.0, 2.0, 4.0]),  # more anchors than layers
        ([0.0, 1.0, 2.0, 3.0, 4.0], 2, [0.0, 4.0]),
        ([0.5, 1.0], 3, [0.5, 0.75, 1.0]),
    ],
)
def test_interpolate_gradient(values: list[float], n: int, expected: list[float]) -> None:
    got = interpolate_gradient(values, n)
    assert len(got) == n
    assert got == pytest.approx(expected, abs=1e-15)


def test_gradient_hits_anchors_exactly() -> None:
    values = [0.1, 0.7, 0.3, 0.9]
    got = interpolate_gradient(values, 31)  # anchors land on layers 0, 10, 20, 30
    assert [got[0], got[10], got[20], got[30]] == values
    between = got[10:21]  # from 0.7 down to 0.3, linearly
    assert all(a > b for a, b in zip(between, between[1:], strict=False))
    assert between[5] == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError):
        interpolate_gradient([], 3)
    with pytest.raises(ValueError):
        interpolate_gradient([1.0], 0)
