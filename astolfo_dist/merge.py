"""The Python API: inputs -> plan -> shards -> executor -> commit. The CLI wraps this."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .budget import MemoryPlan, default_tensor_cache, fit, parse_size
from .errors import MergeCancelled, UsageError
from .executors.local import run_local
from .executors.ray import RayOptions
from .formats.header import Header, read_header
from .formats.readers import RangeReader, open_reader
from .formats.sources import ModelSource, resolve_model
from .formats.writer import OutputSet, PartialWriter, check_output
from .journal import Journal, journal_path, load_entries, verify
from .plan import Plan, PlanReport, build_plan
from .progress import progress_bar
from .recipe.spec import MergeRecipe
from .shards import Shard, make_shards, shard_target
from .worker import ShardResult, WorkerContext

log = logging.getLogger(__name__)

DEFAULT_CHUNK_MB = 2.0  # 512 Ki float32s: the fastest on the benchmark machine (see README)


@dataclass
class MergeResult:
    output: Path
    report: PlanReport
    tensors: int
    read_bytes: int
    written_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    computed_shards: list[int] = field(default_factory=list)
    reused_shards: list[int] = field(default_factory=list)  # verified from an earlier run's journal


def _parse_replace(replace: Sequence[str] | Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in replace:
        if isinstance(item, str):
            prefix, sep, model = item.partition("=")
            if not sep:
                raise UsageError(f"--replace {item!r}: expected PREFIX=MODEL")
            pairs.append((prefix, model))
        else:
            pairs.append((item[0], item[1]))
    return tuple(pairs)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be cpu or cuda[:N], not {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, not {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


class Inputs:
    """The resolved models with one open reader and one validated header per file."""

    def __init__(self, recipe: MergeRecipe, cache_dir: Path | None) -> None:
        self.readers: dict[str, RangeReader] = {}
        self.headers: dict[str, Header] = {}
        try:
            self.models = [resolve_model(m, cache_dir) for m in recipe.inputs]
            donor_names = list(dict.fromkeys(donor for _prefix, donor in recipe.replace))
            self.donors = [resolve_model(d, cache_dir) for d in donor_names]
            shared: dict[object, object] = {}  # the inputs' headers share their key names and shapes
            for model in self.models + self.donors:
                for file in model.files:
                    if file not in self.readers:
                        self.readers[file] = open_reader(file, cache_dir=cache_dir)
                        self.headers[file] = read_header(self.readers[file], shared)
        except BaseException:
            self.close()
            raise

    @property
    def all_models(self) -> list[ModelSource]:
        return self.models + self.donors

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


def plan_merge(recipe: MergeRecipe, inputs: Inputs, shard_size: int | None = None) -> Plan:
    return build_plan(recipe, inputs.models, inputs.donors, inputs.headers, shard_size=shard_size)


def plan_for(recipe: MergeRecipe, cache_dir: Path | None = None, shard_size: int | None = None) -> Plan:
    """The plan of a merge, from the inputs' headers alone (no tensor data is read)."""
    inputs = Inputs(recipe, cache_dir)
    try:
        return plan_merge(recipe, inputs, shard_size)
    finally:
        inputs.close()


EXECUTORS = ("local", "ray")


def merge(
    models: Sequence[str],
    output: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    keys: str = "strict",
    dtype: str = "keep",
    accumulate: str = "auto",
    drop: Sequence[str] = (),
    replace: Sequence[str] | Sequence[tuple[str, str]] = (),
    method: str | None = None,
    base: str | None = None,
    params: dict[str, object] | None = None,
    **options: Any,
) -> MergeResult:
    """Merge `models` into one safetensors file at `output` (or, with `shard_size`, a folder
    of Hugging Face style shards and their index). The keyword arguments up to `params` make
    the recipe (see MergeRecipe); `options` are run_recipe's (executor, memory, workers...).

    Weights are normalised to sum to 1 (default: uniform 1/N).
    """
    if base and not method:
        raise UsageError("--base needs --method (a task-vector method such as ties, dare, task_arithmetic)")
    recipe = MergeRecipe(
        models=tuple(str(m) for m in models),
        weights=None if weights is None else tuple(float(w) for w in weights),
        keys=keys,  # type: ignore[arg-type]
        dtype=dtype,
        accumulate=accumulate,
        drop=tuple(drop),
        replace=_parse_replace(replace),
        method_name=method or "",
        params=tuple(sorted((params or {}).items())),
        base=str(base) if base else None,
    )
    return run_recipe(recipe, output, **options)


def run_recipe(
    recipe: MergeRecipe,
    output: str | os.PathLike[str],
    *,
    chunk_mb: float | None = None,
    shard_mb: float | None = None,
    workers: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = False,
    executor: str = "local",
    address: str | None = None,
    sink: str = "auto",
    spill_dir: str | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    memory: int | str | None = None,
    object_store_mb: float | None = None,
    writer_inflight_mb: float | None = None,
    tensor_cache_mb: float | None = None,
) -> MergeResult:
    """Run a recipe. `executor="ray"` runs the shards as Ray tasks (`address`: an existing
    cluster; default a private local Ray). `resume=True` reuses the shards a killed earlier
    run of the same plan finished. Raises InputError for bad inputs, UsageError for bad
    options, MergeCancelled on Ctrl-C; in every failure the partial output is removed and an
    existing output is untouched."""
    if chunk_mb is not None and chunk_mb <= 0:
        raise UsageError("--chunk-mb must be positive")
    try:
        budget = parse_size(memory) if isinstance(memory, str) else memory
    except ValueError as exc:
        raise UsageError(f"--memory: {exc}") from None
    if shard_mb is not None and shard_mb <= 0:
        raise UsageError("--shard-mb must be positive")
    if shard_size is not None and shard_size <= 0:
        raise UsageError("--shard-size must be positive")
    if tensor_cache_mb is not None and tensor_cache_mb < 0:
        raise UsageError("--tensor-cache-mb must not be negative")
    if executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    if address and executor != "ray":
        raise UsageError("--address needs --executor ray")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UsageError("--workers must be at least 1")
    dev = _device(device)
    out = Path(output)
    check_output(out, overwrite, shard_size is not None)
    started = time.perf_counter()

    inputs = Inputs(recipe, Path(cache_dir) if cache_dir else None)
    try:
        plan = plan_merge(recipe, inputs, shard_size)
        inputs.headers.clear()  # the plan holds what the merge needs; N parsed headers would grow with N
        for line in plan.report.lines():
            log.info("%s", line)
        shards = make_shards(plan, int(shard_mb * (1 << 20)) if shard_mb else None)
        target = shard_target_of(plan, shard_mb)
        # The accumulator chunk counts `chunk_mb` of float32s; the output never depends on it.
        mem = fit(
            plan,
            budget,
            workers=workers,
            chunk_elems=max(1, int(chunk_mb * (1 << 20)) // 4) if chunk_mb else None,
            default_chunk_elems=int(DEFAULT_CHUNK_MB * (1 << 20)) // 4,
            private_ray=executor == "ray" and not address,
            cuda=dev.type == "cuda",
            object_store=int(object_store_mb * (1 << 20)) if object_store_mb else None,
            writer_inflight=int(writer_inflight_mb * (1 << 20)) if writer_inflight_mb else None,
            tensor_cache=None if tensor_cache_mb is None else int(tensor_cache_mb * (1 << 20)),
        )
        log.info("%s", mem.describe())
        layouts = [(o.name, o.header, o.size) for o in plan.outputs]
        earlier = load_entries(journal_path(out), plan.digest(), target) if resume else {}
        outputs = OutputSet(out, layouts, overwrite, resume=bool(earlier))
        try:
            done: set[int] = set()
            if outputs.resumed:
                done = verify(plan, shards, earlier, outputs.paths)
                log.info("resuming: %d of %d shards verified and reused", len(done), len(shards))
            journal = Journal(journal_path(out), plan.digest(), target, {i: earlier[i] for i in done})
            todo = [s for s in shards if s.index not in done]
            try:
                with progress_bar(plan.read_bytes, progress) as on_progress:
                    on_progress(sum(shards[i].read_bytes for i in done))
                    store = mem.object_store or RayOptions.object_store_bytes
                    ray_options = RayOptions(address, sink, spill_dir, store)
                    results = _execute(plan, todo, outputs, journal, inputs.readers, on_progress, mem, dev, executor,
                                       ray_options, str(cache_dir) if cache_dir else None)
            finally:
                journal.close()
            if plan.sharded:
                outputs.write_index(plan.index_json())
            outputs.commit()
            journal.remove()
        except KeyboardInterrupt:
            _discard(outputs, out)
            raise MergeCancelled("interrupted; the partial output was removed") from None
        except BaseException:
            _discard(outputs, out)
            raise
    finally:
        inputs.close()

    warnings = list(plan.report.warnings)
    for r in results:
        warnings.extend(w for w in r.warnings if w not in warnings)
    for w in warnings[len(plan.report.warnings) :]:
        log.warning("%s", w)
    return MergeResult(
        output=out,
        report=plan.report,
        tensors=len(plan.tensors),
        read_bytes=sum(r.read_bytes for r in results),
        written_bytes=plan.written_bytes,
        seconds=time.perf_counter() - started,
        warnings=warnings,
        computed_shards=sorted(r.shard for r in results),
        reused_shards=sorted(done),
    )


def shard_target_of(plan: Plan, shard_mb: float | None) -> int:
    return int(shard_mb * (1 << 20)) if shard_mb else shard_target(plan)


def _discard(outputs: OutputSet, out: Path) -> None:
    outputs.abort()
    try:
        os.unlink(journal_path(out))
    except FileNotFoundError:
        pass


def _execute(
    plan: Plan,
    shards: list[Shard],
    outputs: OutputSet,
    journal: Journal,
    readers: dict[str, RangeReader],
    on_progress: Callable[[int], None],
    mem: MemoryPlan,
    device: torch.device,
    executor: str,
    ray_options: RayOptions,
    cache_dir: str | None,
) -> list[ShardResult]:
    def finished(result: ShardResult) -> None:
        journal.record(result.shard, result.crc32, result.written_bytes)

    if executor == "ray":
        from .executors.ray import TaskSpec, run_ray

        def finished_remote(result: ShardResult) -> None:
            finished(result)
            on_progress(result.read_bytes)

        spec = TaskSpec(tuple(outputs.paths), None, mem.chunk_elems, str(device), mem.readahead, mem.writer_inflight,
                        cache_dir, mem.tensor_cache)
        return run_ray(plan, shards, spec, workers=mem.workers, options=ray_options, on_done=finished_remote)
    sink = PartialWriter(outputs.paths)
    try:
        cache = mem.tensor_cache if mem.tensor_cache is not None else default_tensor_cache(device, mem.workers)
        ctx = WorkerContext(plan, readers, sink, mem.chunk_elems, device, threading.Event(), on_progress, mem.readahead,
                            cache)
        return run_local(ctx, shards, min(mem.workers, max(1, len(shards))), finished)
    finally:
        sink.close()

