"""Ray executor: the same shards as Ray tasks on a private local Ray or an existing cluster.

Tasks receive the plan (put once in the object store), a shard and where to write; never
tensors. Tasks in flight are bounded. Each task checks the input files it reads (size and
header digest) on its own node before reading them. Output goes either straight into the
partial files (`direct`: every node sees the output's folder) or through a writer actor on
the driver's node (`writer`: chunks travel through the object store, bounded in flight).
Ray retries the tasks of a dead worker or node; a retried shard writes the same bytes at the
same offsets, so the output does not change.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import psutil
import torch

from ..budget import default_tensor_cache
from ..errors import AstolfoError, InputError, UsageError
from ..formats.readers import RangeReader, open_reader, read_bytes
from ..formats.writer import PartialWriter
from ..plan import InputCheck, Plan
from ..shards import Shard
from ..worker import ChunkBuffers, ShardResult, WorkerContext, run_shard

log = logging.getLogger(__name__)

OnShardDone = Callable[[ShardResult], None]
SINKS = ("auto", "direct", "writer")
TASK_RETRIES = 3


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a private local Ray and stop it at the end
    sink: str = "auto"
    spill_dir: str | None = None
    object_store_bytes: int = 256 << 20  # of a private local Ray


# --- what runs in a task ----------------------------------------------------------------------


def _mismatch(check: InputCheck, reader: RangeReader) -> str | None:
    """Why the file `reader` opened is not the one the plan was made from (None: it is)."""
    import platform

    if reader.size != check.size:
        return f"is {reader.size} bytes on node {platform.node()}, {check.size} where the merge was planned"
    n = int.from_bytes(read_bytes(reader, 0, 8), "little")
    digest = hashlib.sha256(read_bytes(reader, 8, n)).hexdigest() if 0 < n <= reader.size - 8 else ""
    if digest != check.header_sha256:
        return f"header differs on node {platform.node()} from the planned file"
    return None


def held_inputs(checks: tuple[InputCheck, ...]) -> list[int]:
    """Which of the plan's input files this node holds (right size and header)."""
    held = []
    for i, check in enumerate(checks):
        try:
            reader = open_reader(check.file)
        except AstolfoError:
            continue
        try:
            if _mismatch(check, reader) is None:
                held.append(i)
        finally:
            reader.close()
    return held


def _checked_readers(plan: Plan, files: set[str], cache_dir: str | None = None) -> dict[str, RangeReader]:
    """Open the shard's inputs on this node and check they are the files the plan was made from."""
    readers: dict[str, RangeReader] = {}
    try:
        for check in plan.inputs:
            if check.file not in files:
                continue
            reader = readers[check.file] = open_reader(check.file, cache_dir=cache_dir)
            problem = _mismatch(check, reader)
            if problem:
                raise InputError(check.file, problem)
    except BaseException:
        for r in readers.values():
            r.close()
        raise
    return readers


# Chunks are sent to the writer in batches of about this size: one actor call and one
# object per chunk cost ~10 ms each (benchmarks/results/cluster_cost.md); 8 MiB messages
# measured 4x faster.
WRITER_BATCH_BYTES = 8 << 20


class _ActorSink:
    """Sends chunks to the writer actor in batches; waits when too many bytes are in flight."""

    def __init__(self, writer: object, limit: int) -> None:
        self.writer = writer
        self.limit = limit
        self.inflight: deque[tuple[object, int]] = deque()
        self.bytes = 0
        self.batch = bytearray()
        self.places: list[tuple[int, int, int]] = []  # (file, offset, length) of each chunk in the batch

    def write(self, file: int, offset: int, data: memoryview) -> None:
        self.places.append((file, offset, len(data)))
        self.batch += data  # a copy: the worker's buffer is reused for the next chunk
        if len(self.batch) >= min(WRITER_BATCH_BYTES, self.limit):
            self._send()

    def _send(self) -> None:
        import ray

        if not self.places:
            return
        arr = np.frombuffer(self.batch, dtype=np.uint8)
        ref = self.writer.write_many.remote(self.places, arr)  # type: ignore[attr-defined]
        self.inflight.append((ref, len(arr)))
        self.bytes += len(arr)
        self.batch, self.places = bytearray(), []
        while self.bytes > self.limit and self.inflight:
            ref, n = self.inflight.popleft()
            ray.get(ref)
            self.bytes -= n

    def flush(self) -> None:
        import ray

        self._send()
        ray.get([ref for ref, _n in self.inflight])
        self.inflight.clear()
        self.bytes = 0


@dataclass(frozen=True)
class TaskSpec:
    """Everything a shard task needs besides the plan and the shard: paths and sizes, no data."""

    paths: tuple[str, ...]  # the partial output files (direct sink)
    writer: object | None  # the writer actor (writer sink)
    chunk_elems: int
    device: str
    readahead: int
    writer_inflight: int  # bytes one task may have on their way to the writer
    cache_dir: str | None = None  # local cache of remote byte ranges, on each node
    tensor_cache: int | None = 0  # WorkerContext.tensor_cache; None: the CUDA default of the task's node


# One plan per worker process, kept between tasks: a plan of 64 SDXL inputs takes ~0.7 s
# to unpickle, which every task paid when it received the plan as an argument. The plan
# comes as an ObjectRef inside a list (so Ray does not resolve it) and is fetched once.
_PLAN_CACHE: dict[str, Plan] = {}


def _plan_of(boxed: list) -> Plan:
    import ray

    ref = boxed[0]
    key = ref.hex()
    if key not in _PLAN_CACHE:
        _PLAN_CACHE.clear()  # only the current merge's plan
        _PLAN_CACHE[key] = ray.get(ref)
    return _PLAN_CACHE[key]


def run_shard_task(boxed_plan: list, shard: Shard, spec: TaskSpec) -> ShardResult:
    torch.set_num_threads(1)
    plan = _plan_of(boxed_plan)
    readers = _checked_readers(plan, shard_files(plan, shard), spec.cache_dir)
    sink: PartialWriter | _ActorSink = (
        PartialWriter(spec.paths) if spec.writer is None else _ActorSink(spec.writer, spec.writer_inflight)
    )
    try:
        dev = torch.device(spec.device)
        # A node runs as many tasks at once as it has CPUs, whatever --workers says: they share its GPU.
        cache = spec.tensor_cache if spec.tensor_cache is not None else default_tensor_cache(dev, os.cpu_count() or 1)
        ctx = WorkerContext(plan, readers, sink, spec.chunk_elems, dev, threading.Event(), readahead=spec.readahead,
                            tensor_cache=cache)
        result = run_shard(ctx, shard, ChunkBuffers(spec.chunk_elems, dev))
        if isinstance(sink, _ActorSink):
            sink.flush()  # the shard is done only once its bytes are written
        return result
    finally:
        if isinstance(sink, PartialWriter):
            sink.close()
        for r in readers.values():
            r.close()


class OutputWriter:
    """The writer actor, pinned to the driver's node: positioned writes of received chunks."""

    def __init__(self, paths: list[str]) -> None:
        self.writer = PartialWriter(paths)

    def write_many(self, places: list[tuple[int, int, int]], data: np.ndarray) -> int:
        view = memoryview(data)  # zero-copy view of the object store
        pos = 0
        for file, offset, length in places:
            self.writer.write(file, offset, view[pos : pos + length])
            pos += length
        return pos

    def close(self) -> None:
        self.writer.close()


def sees_output(path: str, size: int, head: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return os.fstat(f.fileno()).st_size == size and f.read(len(head)) == head
    except OSError:
        return False


# --- the driver ---------------------------------------------------------------------------------

# A private local Ray lives in its own temp folder, tagged with its driver's pid and start
# time. Ray's per-node agents do not die with a SIGKILLed driver; the next private start
# (or `reap_stale_private_rays()`) ends the processes of folders whose driver is gone.
PRIVATE_PREFIX = "astolfo-ray-"
PRIVATE_ENV = "ASTOLFO_PRIVATE_RAY"
_DRIVER_FILE = "astolfo-driver"


def _private_root() -> str:
    return tempfile.gettempdir()


def _private_temp_dir() -> str:
    # Short: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    folder = tempfile.mkdtemp(prefix=PRIVATE_PREFIX, dir=_private_root())
    me = psutil.Process()
    with open(os.path.join(folder, _DRIVER_FILE), "w") as f:
        f.write(f"{me.pid} {me.create_time()}")
    return folder


def _remove_private_temp_dir() -> None:
    me = psutil.Process()
    for folder in glob.glob(os.path.join(_private_root(), PRIVATE_PREFIX + "*")):
        if _driver_of(folder) == (me.pid, me.create_time()):
            shutil.rmtree(folder, ignore_errors=True)


def _driver_of(folder: str) -> tuple[int, float] | None:
    try:
        pid, created = open(os.path.join(folder, _DRIVER_FILE)).read().split()
        return int(pid), float(created)
    except (OSError, ValueError):
        return None


def _belongs_to(proc: psutil.Process, folder: str) -> bool:
    """Workers carry the environment marker; Ray's agents start with a clean environment
    but keep their log files in the folder open."""
    try:
        if proc.environ().get(PRIVATE_ENV) == folder:
            return True
        return any(f.path.startswith(folder + os.sep) for f in proc.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def reap_stale_private_rays() -> list[int]:
    """Stop what is left of private Rays whose driver died; returns the pids ended."""
    ended: list[int] = []
    for folder in glob.glob(os.path.join(_private_root(), PRIVATE_PREFIX + "*")):
        driver = _driver_of(folder)
        if driver is None:
            continue
        try:
            if psutil.Process(driver[0]).create_time() == driver[1]:
                continue  # its driver is alive
        except psutil.NoSuchProcess:
            pass
        leftovers = []
        for proc in psutil.process_iter():
            if _belongs_to(proc, folder):
                leftovers.append(proc)
        for proc in leftovers:
            try:
                proc.kill()
                ended.append(proc.pid)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)
        shutil.rmtree(folder, ignore_errors=True)
        log.info("ended %d processes of a private Ray whose driver died (%s)", len(leftovers), folder)
    return ended



def _connect(options: RayOptions, workers: int) -> str:
    """Join the given cluster or start a private local one: "existing" (this process was
    already connected: leave it so), "joined" or "started" (disconnect / stop at the end)."""
    import ray

    if ray.is_initialized():
        return "existing"
    if options.address:
        ray.init(address=options.address, log_to_driver=False, configure_logging=False)
        return "joined"
    system_config = {}
    if options.spill_dir:
        os.makedirs(options.spill_dir, exist_ok=True)
        system_config["object_spilling_config"] = json.dumps(
            {"type": "filesystem", "params": {"directory_path": options.spill_dir}}
        )
    reap_stale_private_rays()
    temp_dir = _private_temp_dir()
    # Every process of the private Ray inherits this marker, which the reaper looks for:
    # workers and agents rename themselves, so their command lines cannot be trusted.
    previous = os.environ.get(PRIVATE_ENV)
    os.environ[PRIVATE_ENV] = temp_dir
    try:
        _init_private(options, workers, temp_dir, system_config)
    finally:
        if previous is None:
            os.environ.pop(PRIVATE_ENV, None)
        else:
            os.environ[PRIVATE_ENV] = previous
    return "started"


def _init_private(options: RayOptions, workers: int, temp_dir: str, system_config: dict) -> None:
    import ray

    # address="local": never attach to some other cluster found on this machine.
    ray.init(
        address="local",
        _temp_dir=temp_dir,
        num_cpus=workers,
        object_store_memory=options.object_store_bytes,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _system_config=system_config or None,
        log_to_driver=False,
        configure_logging=False,
    )
    # ray.init writes a token for a new local cluster with the default umask (0644 here):
    # the token is the only guard of Ray's ports, so only its owner may read it.
    token = os.path.expanduser("~/.ray/auth_token")
    if os.path.exists(token):
        os.chmod(token, 0o600)


def choose_sink(options: RayOptions, paths: list[str], plan: Plan, started_local: bool) -> str:
    if options.sink not in SINKS:
        raise UsageError(f"--sink must be one of {', '.join(SINKS)}, not {options.sink!r}")
    if options.sink != "auto":
        return options.sink
    if started_local:
        return "direct"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(sees_output)
    head = plan.outputs[0].header[:64]
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            paths[0], plan.outputs[0].size, head
        )
        for n in ray.nodes()
        if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0
    ]
    every = all(ray.get(refs))
    log.info("sink: %s (%s)", "direct" if every else "writer",
             "every node sees the output folder" if every else "some node does not see the output folder")
    return "direct" if every else "writer"


def shard_files(plan: Plan, shard: Shard) -> set[str]:
    return {s.file for p in shard.pieces for s in plan.tensors[p.tensor].sources}


def probe_holders(plan: Plan) -> tuple[list[str], dict[str, set[str]]]:
    """Alive worker nodes, and for each input file the nodes that hold it (checked there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n.get("Resources", {}).get("CPU", 0) > 0)
    probe = ray.remote(num_cpus=0)(held_inputs)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(plan.inputs)
            for n in nodes]
    holders: dict[str, set[str]] = {c.file: set() for c in plan.inputs}
    for node, held in zip(nodes, ray.get(refs), strict=True):
        for i in held:
            holders[plan.inputs[i].file].add(node)
    return nodes, holders


def assign_nodes(
    needs: dict[int, set[str]], cost: dict[int, int], holders: dict[str, set[str]], nodes: list[str]
) -> dict[int, str | None]:
    """Node per shard, where inputs are node-local copies: a node holding every file the
    shard reads, the least loaded (by bytes) first. None everywhere when every node holds
    every input: then Ray places tasks freely."""
    everywhere = set(nodes)
    if all(holders.get(f, set()) >= everywhere for files in needs.values() for f in files):
        return dict.fromkeys(needs)
    load = dict.fromkeys(nodes, 0)
    out: dict[int, str | None] = {}
    for index in sorted(needs):
        candidates = set(everywhere)
        for f in needs[index]:
            candidates &= holders.get(f, set())
        if not candidates:
            scarce = min(needs[index], key=lambda f: len(holders.get(f, set()) & everywhere))
            where = len(holders.get(scarce, set()) & everywhere)
            raise InputError(scarce, f"no alive node holds every input of shard {index} "
                                     f"(this file is on {where} of {len(nodes)} nodes)")
        node = min(candidates, key=lambda n: (load[n], n))
        load[node] += cost[index]
        out[index] = node
    return out


def run_ray(
    plan: Plan,
    shards: list[Shard],
    spec: TaskSpec,
    *,
    workers: int,
    options: RayOptions,
    on_done: OnShardDone,
) -> list[ShardResult]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    started = _connect(options, workers)
    writer = None
    pending: dict[object, int] = {}
    try:
        paths = list(spec.paths)
        sink = choose_sink(options, paths, plan, started == "started")
        plan_ref = ray.put(plan)
        if sink == "writer":
            here = ray.get_runtime_context().get_node_id()
            writer = (
                ray.remote(OutputWriter)
                .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
                .remote(paths)
            )
        total_cpus = int(ray.cluster_resources().get("CPU", workers))
        max_in_flight = max(2, 2 * total_cpus)  # enough to keep every CPU busy, no more
        # The writer's bound is for all tasks together: each in-flight task gets its share.
        per_task = max(1 << 20, spec.writer_inflight // max_in_flight)
        spec = replace(spec, writer=writer, writer_inflight=per_task)
        task = ray.remote(run_shard_task)
        needs = {s.index: shard_files(plan, s) for s in shards}
        cost = {s.index: s.read_bytes for s in shards}
        placement: dict[int, str | None] = dict.fromkeys(needs)
        if started != "started":  # a private Ray is one node: nothing to place
            nodes, holders = probe_holders(plan)
            placement = assign_nodes(needs, cost, holders, nodes)
        by_index = {s.index: s for s in shards}
        attempts = dict.fromkeys(by_index, 0)

        def submit(shard: Shard) -> None:
            node = placement[shard.index]
            opts: dict[str, object] = {"num_cpus": 1, "max_retries": TASK_RETRIES}
            if node is not None:
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
            ref = task.options(**opts).remote([plan_ref], shard, spec)
            pending[ref] = shard.index

        queue = deque(shards)
        results: list[ShardResult] = []
        while queue or pending:
            while queue and len(pending) < max_in_flight:
                submit(queue.popleft())
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    result = _get(ref)
                except ray.exceptions.RayError:
                    # A placed shard whose node died: Ray cannot move a task pinned to a
                    # dead node, so place it again on a live holder of its inputs.
                    if placement[index] is None or attempts[index] >= TASK_RETRIES:
                        raise
                    attempts[index] += 1
                    nodes, holders = probe_holders(plan)
                    placement.update(assign_nodes({index: needs[index]}, cost, holders, nodes))
                    submit(by_index[index])
                    continue
                on_done(result)
                results.append(result)
        return results
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if writer is not None:
            try:
                ray.get(writer.close.remote())
            except Exception:  # the actor may be gone with its node; nothing left to close
                pass
            ray.kill(writer)
        if started != "existing":
            ray.shutdown()  # stops a private Ray; only disconnects from a joined cluster
        if started == "started":
            _remove_private_temp_dir()


def _get(ref: object) -> ShardResult:
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, AstolfoError):
            raise cause from None
        raise
