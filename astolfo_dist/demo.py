"""The embedded default job: make small SD1.5-layout checkpoints and merge them the
AstolfoMix way (uniform average, text encoder from a donor)."""

from __future__ import annotations

import logging
from pathlib import Path

from .merge import MergeResult, merge
from .synthetic import make_state_dict, write_checkpoint

log = logging.getLogger(__name__)

TEXT_ENCODER = "cond_stage_model."


def run_demo(folder: Path, models: int = 4, scale: int = 16, workers: int | None = None) -> MergeResult:
    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    for i in range(models):
        path = folder / f"community-{i + 1:02d}.safetensors"
        if not path.exists():
            write_checkpoint(path, make_state_dict("sd15", scale=scale, seed=i + 1))
        inputs.append(str(path))
    donor = folder / "donor-sd14.safetensors"
    if not donor.exists():
        write_checkpoint(donor, make_state_dict("sd15", scale=scale, seed=1000))
    log.info("made %d SD1.5-layout checkpoints (1/%d size) and a donor in %s", models, scale, folder)
    return merge(
        inputs,
        folder / "astolfomix-demo.safetensors",
        replace=[(TEXT_ENCODER, str(donor))],
        overwrite=True,
        workers=workers,
    )
