"""The Plan: from the recipe and the inputs' headers alone, every output tensor, where its
inputs live, how it is computed and where its bytes go. No tensor data is read here.

Key-set policy, shape checks, integer tensors, dropped and replaced keys are all decided
here, once, and reported.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Literal

from . import __version__
from .errors import InputError, UsageError
from .formats.dtypes import DTYPES, NEEDS_FP64_ACCUMULATOR, OUTPUT_DTYPES, DType
from .formats.header import Header, TensorInfo, build_header, layout_order
from .formats.sources import ModelSource
from .recipe.spec import MergeRecipe

Op = Literal["reduce", "copy"]


@dataclass(frozen=True, slots=True)
class Source:
    """One input tensor: model index (inputs first, then donors), file, absolute offset, dtype."""

    model: int
    file: str
    offset: int
    dtype: str


@dataclass(frozen=True, slots=True)
class NodeCall:
    """One recipe node's method, as it applies to one key. `args` index the tensor's values:
    its sources first, then the outputs of the nodes before this one in the graph."""

    node: str
    method: str
    params: tuple[tuple[str, object], ...]
    args: tuple[int, ...]
    base: int | None  # the base's position in `args`


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # output dtype
    begin: int  # absolute byte range in its output file
    end: int
    op: Op
    sources: tuple[Source, ...]  # reduce: in recipe order; copy: [0] is copied, the rest compared
    weights: tuple[float, ...] = ()  # reduce: normalised weights, one per source
    accumulator: str = "F32"  # reduce: the accumulation dtype
    file: int = 0  # index into plan.outputs
    # recipe.library methods run over the whole tensor, the last one's value is the output;
    # empty: the streaming weighted sum with `weights`.
    graph: tuple[NodeCall, ...] = ()

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def units(self) -> int:
        """What the worker iterates over: elements for a reduction, bytes for a copy."""
        return self.numel if self.op == "reduce" else self.end - self.begin

    def read_bytes_per_unit(self) -> float:
        if self.op == "copy":
            return float(len(self.sources))
        return float(sum(DTYPES[s.dtype].bits for s in self.sources)) / 8


@dataclass
class PlanReport:
    """What the plan decided about keys, per input; shown to the user, never silently."""

    missing: dict[str, list[str]] = field(default_factory=dict)  # input -> keys others have
    skipped: list[str] = field(default_factory=list)  # keys left out by --keys intersection
    dropped: list[str] = field(default_factory=list)
    replaced: dict[str, int] = field(default_factory=dict)  # prefix -> number of keys
    copied: list[str] = field(default_factory=list)  # integer / bool / quantised tensors
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for model, keys in self.missing.items():
            if keys:
                out.append(f"{model}: lacks {len(keys)} keys the other inputs have (e.g. {keys[0]})")
        if self.skipped:
            out.append(f"keys policy left out {len(self.skipped)} keys not held by every input")
        if self.dropped:
            out.append(f"dropped {len(self.dropped)} keys matching --drop")
        for prefix, count in self.replaced.items():
            out.append(f"replaced {count} keys under {prefix!r} from the donor")
        if self.copied:
            out.append(f"copied {len(self.copied)} integer/bool/quantised tensors from the first input holding them")
        return out + self.warnings


@dataclass(frozen=True)
class ModelInfo:
    name: str
    files: tuple[str, ...]
    size: int
    header_sha256: str  # identity of the input without hashing gigabytes of data


@dataclass(frozen=True)
class OutputLayout:
    """One output file: its name (relative to the output folder when sharded), header, size."""

    name: str
    header: bytes
    size: int


@dataclass(frozen=True)
class InputCheck:
    """What a worker verifies about an input file before reading it, wherever it runs."""

    file: str
    size: int
    header_sha256: str


@dataclass(frozen=True)
class Plan:
    recipe: MergeRecipe
    models: tuple[ModelInfo, ...]  # the recipe's inputs, then the donors of --replace
    tensors: tuple[PlannedTensor, ...]  # in output layout order
    outputs: tuple[OutputLayout, ...]  # one file, or Hugging Face style shards
    inputs: tuple[InputCheck, ...]
    report: PlanReport

    @property
    def sharded(self) -> bool:
        return len(self.outputs) > 1 or self.outputs[0].name != SINGLE_OUTPUT

    @property
    def read_bytes(self) -> int:
        return int(sum(t.units * t.read_bytes_per_unit() for t in self.tensors))

    @property
    def written_bytes(self) -> int:
        return sum(o.size for o in self.outputs)

    def digest(self) -> str:
        """Identifies the plan's bytes: the output headers hold the recipe, the inputs'
        header digests and every tensor's place."""
        h = hashlib.sha256()
        for out in self.outputs:
            h.update(out.name.encode() + b"\0" + out.header)
        return h.hexdigest()

    def index_json(self) -> str:
        """model.safetensors.index.json for sharded output."""
        weight_map = {t.name: self.outputs[t.file].name for t in sorted(self.tensors, key=lambda t: t.name)}
        return json.dumps({"metadata": {"total_size": sum(t.end - t.begin for t in self.tensors)},
                           "weight_map": weight_map}, indent=2) + "\n"


SINGLE_OUTPUT = ""  # OutputLayout.name of a single-file output: the -o path itself


@dataclass(frozen=True, slots=True)
class _Held:
    file: str
    header: Header
    info: TensorInfo


def _model_tensors(model: ModelSource, headers: dict[str, Header]) -> dict[str, _Held]:
    """Key -> tensor of one model, across its shard files (a key in two shards is an error)."""
    held: dict[str, _Held] = {}
    for file in model.files:
        header = headers[file]
        for name, info in header.tensors.items():
            if name in held:
                raise InputError(file, f"tensor is also in {held[name].file}", key=name)
            held[name] = _Held(file, header, info)
    return held


def _source(model: int, held: _Held) -> Source:
    return Source(model, held.file, held.header.absolute(held.info), held.info.dtype.name)


def _out_dtype(recipe: MergeRecipe, first: DType) -> str:
    return first.name if recipe.dtype == "keep" else OUTPUT_DTYPES[recipe.dtype]


def _accumulator(recipe: MergeRecipe, out_dtype: str) -> str:
    if recipe.accumulate == "auto":
        return "F64" if out_dtype in NEEDS_FP64_ACCUMULATOR else "F32"
    return {"fp32": "F32", "fp64": "F64"}[recipe.accumulate]


def build_plan(
    recipe: MergeRecipe,
    inputs: list[ModelSource],
    donors: list[ModelSource],
    headers: dict[str, Header],
    extra_metadata: dict[str, str] | None = None,
    shard_size: int | None = None,
) -> Plan:
    """`inputs` follow `recipe.models`; `donors` follow the unique donor names of `recipe.replace`."""
    models = inputs + donors
    tensors_of = [_model_tensors(m, headers) for m in models]
    donor_index = {m.name: len(inputs) + i for i, m in enumerate(donors)}
    drop = [re.compile(p) for p in recipe.drop]
    report = PlanReport()

    def dropped(key: str) -> bool:
        return any(p.search(key) for p in drop)

    # Longest prefix wins where two --replace prefixes match the same key.
    prefixes = sorted(recipe.replace, key=lambda pair: -len(pair[0]))

    def replacement(key: str) -> tuple[str, str] | None:
        return next((pair for pair in prefixes if key.startswith(pair[0])), None)

    planned: dict[str, tuple[Op, tuple[Source, ...], tuple[float, ...], DType, tuple[int, ...]]] = {}

    # Component replacement: every donor key under the prefix, copied unchanged.
    for prefix, donor in recipe.replace:
        d = donor_index[donor]
        count = 0
        for key, held in tensors_of[d].items():
            if replacement(key) != (prefix, donor) or dropped(key):
                continue
            planned[key] = ("copy", (_source(d, held),), (), held.info.dtype, held.info.shape)
            count += 1
        if count == 0:
            raise InputError(donor, f"donor holds no tensor under --replace prefix {prefix!r}")
        report.replaced[prefix] = count

    # The merged keys: everything the inputs hold that is neither dropped nor replaced.
    union: dict[str, None] = {}
    for i in range(len(inputs)):
        for key in tensors_of[i]:
            if dropped(key):
                if key not in report.dropped:
                    report.dropped.append(key)
            elif replacement(key) is None:
                union[key] = None
    for i, model in enumerate(inputs):
        report.missing[model.name] = [k for k in union if k not in tensors_of[i]]
    if recipe.keys == "strict":
        for model in inputs:
            lacking = report.missing[model.name]
            if lacking:
                raise InputError(
                    model.name,
                    f"lacks {len(lacking)} tensors that other inputs hold "
                    "(use --keys intersection or --keys union to merge anyway)",
                    key=lacking[0],
                )

    n_layers = _layer_count(recipe, union)
    graph = recipe.graph
    for key in union:
        present = [i for i in range(len(inputs)) if key in tensors_of[i]]
        if recipe.keys == "intersection" and len(present) < len(inputs):
            report.skipped.append(key)
            continue
        first = tensors_of[present[0]][key]
        for i in present[1:]:
            other = tensors_of[i][key]
            if other.info.shape != first.info.shape:
                raise InputError(
                    f"{first.file} and {other.file}",
                    f"shape {list(first.info.shape)} vs {list(other.info.shape)}",
                    key=key,
                )
            if other.info.dtype.reducible != first.info.dtype.reducible:
                raise InputError(
                    f"{first.file} and {other.file}",
                    f"dtype {first.info.dtype.name} vs {other.info.dtype.name} (float and non-float)",
                    key=key,
                )
        sources = tuple(_source(i, tensors_of[i][key]) for i in present)
        if first.info.dtype.reducible:
            # Library methods take their weights among their parameters.
            weights = () if graph else recipe.normalised_weights(present, key, n_layers)
            planned[key] = ("reduce", sources, weights, first.info.dtype, first.info.shape)
        else:
            if len({s.dtype for s in sources}) > 1:
                report.warnings.append(
                    f"{key}: inputs disagree on dtype ({', '.join(sorted({s.dtype for s in sources}))}); "
                    f"copied from {first.file}"
                )
            report.copied.append(key)
            planned[key] = ("copy", sources, (), first.info.dtype, first.info.shape)

    if not planned:
        raise UsageError("nothing to merge: every key was dropped or left out")

    # Output dtypes, then the safetensors library's own layout.
    out_dtype: dict[str, DType] = {}
    for key, (op, _sources, _weights, first_dtype, _shape) in planned.items():
        out_dtype[key] = DTYPES[_out_dtype(recipe, first_dtype)] if op == "reduce" else first_dtype
    order = layout_order((key, out_dtype[key]) for key in planned)

    model_infos = tuple(
        ModelInfo(
            m.name,
            m.files,
            sum(headers[f].file_size for f in m.files),
            _header_digest([headers[f] for f in m.files]),
        )
        for m in models
    )
    metadata = _metadata(recipe, model_infos, extra_metadata or {})

    # Values of a key's graph: the sources (every model holds the key: graphs need
    # strict or intersection keys), then the nodes in evaluation order.
    value_of = {name: i for i, name in enumerate(recipe.input_names)}
    value_of.update({node.name: len(recipe.input_names) + j for j, node in enumerate(graph)})

    def calls(key: str) -> tuple[NodeCall, ...]:
        out = []
        for node in graph:
            params = node.params_for(recipe.blocks, key, n_layers) if node.varies else dict(node.params)
            plain = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
            out.append(NodeCall(node.name, node.method, plain, tuple(value_of[a] for a in node.args), node.base_index))
        return tuple(out)

    groups = _split_files(order, {k: out_dtype[k].nbytes(_numel(planned[k][4])) or 0 for k in order}, shard_size)
    outputs: list[OutputLayout] = []
    tensors: list[PlannedTensor] = []
    for file_index, keys in enumerate(groups):
        header, offsets = build_header([(k, out_dtype[k], planned[k][4]) for k in keys], metadata)
        name = SINGLE_OUTPUT if shard_size is None else f"model-{file_index + 1:05d}-of-{len(groups):05d}.safetensors"
        outputs.append(OutputLayout(name, header, len(header) + (offsets[-1][1] if offsets else 0)))
        for key, (begin, end) in zip(keys, offsets, strict=True):
            op, sources, weights, _first, shape = planned[key]
            dt = out_dtype[key].name
            acc = _accumulator(recipe, dt) if op == "reduce" else ""
            tensors.append(
                PlannedTensor(key, shape, dt, len(header) + begin, len(header) + end, op, sources, weights, acc,
                              file_index, calls(key) if op == "reduce" and graph else ())
            )
    files = dict.fromkeys(f for m in models for f in m.files)
    checks = tuple(InputCheck(f, headers[f].file_size, headers[f].digest) for f in files)
    return Plan(recipe, model_infos, tuple(tensors), tuple(outputs), checks, report)


def _layer_count(recipe: MergeRecipe, keys: dict[str, None]) -> int:
    if recipe.blocks != "llm":
        return 0
    from .recipe.blocks import llm_layer

    layers = [n for n in (llm_layer(k) for k in keys) if n is not None]
    return max(layers) + 1 if layers else 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _split_files(order: list[str], nbytes: dict[str, int], shard_size: int | None) -> list[list[str]]:
    """Keys per output file, in layout order: files of at most `shard_size` data bytes (a
    tensor larger than that gets a file of its own), or one file."""
    if shard_size is None:
        return [order]
    groups: list[list[str]] = [[]]
    size = 0
    for key in order:
        if groups[-1] and size + nbytes[key] > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes[key]
    return groups


def _header_digest(headers: list[Header]) -> str:
    """One model's identity from its files' header digests (taken when they were parsed) and sizes."""
    h = hashlib.sha256()
    for header in headers:
        h.update(f"{header.file_size}:{header.digest}\n".encode())
    return h.hexdigest()


def _metadata(recipe: MergeRecipe, models: tuple[ModelInfo, ...], extra: dict[str, str]) -> dict[str, str]:
    """The recipe and inputs, in the keys A1111's web UI reads plus the engine's own."""
    recipe_json = recipe.to_json()
    models_json = json.dumps(
        {
            # Checkpoints of one architecture often share a header byte for byte, so the
            # name joins the header digest in the key: one entry per input, never collapsed.
            hashlib.sha256(f"{m.header_sha256}\0{m.name}".encode()).hexdigest(): {
                "name": m.name, "size": m.size, "header_sha256": m.header_sha256,
                "hash_of": "safetensors header and name"}
            for m in models
        },
        sort_keys=True,
    )
    meta = {
        "sd_merge_recipe": recipe_json,
        "sd_merge_models": models_json,
        "astolfo_dist_version": __version__,
        "astolfo_dist_recipe": recipe_json,
        "format": "pt",
    }
    meta.update(extra)
    return meta
