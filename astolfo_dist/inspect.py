"""`astolfo-dist inspect`: what a checkpoint holds, from its header alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .formats.header import Header, read_header
from .formats.readers import open_reader
from .formats.sources import resolve_model

# Key prefixes of the components model mergers care about, most specific first.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("model_ema.", "EMA weights"),
    ("model.diffusion_model.", "UNet"),
    ("first_stage_model.", "VAE"),
    ("cond_stage_model.", "text encoder (SD1 CLIP-L)"),
    ("conditioner.embedders.0.", "text encoder 1 (SDXL CLIP-L)"),
    ("conditioner.embedders.1.", "text encoder 2 (SDXL OpenCLIP bigG)"),
    ("model.embed_tokens.", "token embedding (LLM)"),
    ("model.layers.", "transformer layers (LLM)"),
    ("model.norm.", "final norm (LLM)"),
    ("lm_head.", "LM head (LLM)"),
)


@dataclass
class ComponentStats:
    tensors: int = 0
    params: int = 0
    bytes: int = 0


@dataclass
class Inspection:
    name: str
    files: tuple[str, ...]
    tensors: int
    params: int
    data_bytes: int
    file_bytes: int
    dtypes: Counter[str]
    components: dict[str, ComponentStats] = field(default_factory=dict)
    metadata_keys: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{self.name}",
            f"  files:      {len(self.files)}",
            f"  tensors:    {self.tensors}",
            f"  parameters: {self.params:,}",
            f"  size:       {self.file_bytes:,} bytes ({self.file_bytes / 2**30:.2f} GiB)",
            "  dtypes:     " + ", ".join(f"{d} x{n}" for d, n in sorted(self.dtypes.items())),
            "  components:",
        ]
        for comp, st in self.components.items():
            out.append(f"    {comp:<40} {st.tensors:>6} tensors {st.params:>15,} params {st.bytes / 2**20:>10.1f} MiB")
        if self.metadata_keys:
            out.append("  metadata:   " + ", ".join(self.metadata_keys))
        return out


def component_of(key: str) -> str:
    return next((label for prefix, label in COMPONENTS if key.startswith(prefix)), "other")


def inspect_model(arg: str) -> Inspection:
    model = resolve_model(arg)
    headers: list[Header] = []
    for file in model.files:
        reader = open_reader(file)
        try:
            headers.append(read_header(reader))
        finally:
            reader.close()
    dtypes: Counter[str] = Counter()
    components: dict[str, ComponentStats] = {}
    params = data = 0
    meta: list[str] = []
    for header in headers:
        meta.extend(k for k in header.metadata if k not in meta)
        for key, info in header.tensors.items():
            dtypes[info.dtype.name] += 1
            st = components.setdefault(component_of(key), ComponentStats())
            st.tensors += 1
            st.params += info.numel
            st.bytes += info.nbytes
            params += info.numel
            data += info.nbytes
    return Inspection(
        name=arg,
        files=model.files,
        tensors=sum(len(h.tensors) for h in headers),
        params=params,
        data_bytes=data,
        file_bytes=sum(h.file_size for h in headers),
        dtypes=dtypes,
        components=dict(sorted(components.items(), key=lambda kv: -kv[1].bytes)),
        metadata_keys=sorted(meta),
    )
