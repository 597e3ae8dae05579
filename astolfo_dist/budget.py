"""The memory budget: from `--memory`, the plan and this process's own footprint, derive
the chunk size, the worker count and the readahead, or refuse before any work, saying how
much the merge needs.

What a merge holds (see DESIGN's memory model): this process (interpreter, torch, the plan)
+ workers x (read buffer + accumulator + scratch + output chunk; for recipe.library methods
also each graph node's value and workspace) + readahead in the page cache + with a private
Ray: its daemons, one process per worker (each imports torch) and the object store.
Figures for Ray's processes were measured on the development machine (README, "Memory and
speed").
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from .errors import UsageError
from .formats.dtypes import DTYPES
from .plan import NodeCall, Plan

if TYPE_CHECKING:
    from .recipe.library.base import Method

MIB = 1 << 20
MIN_CHUNK_ELEMS = 64 << 10
DEFAULT_FRACTION = 0.5  # of the machine's available memory
CGROUP_FRACTION = 0.9  # of a cgroup's limit: its page cache is reclaimable, so most of it is usable
WORKER_SLACK = 4 * MIB  # thread stack, allocator slack, small tensors
PROCESS_SLACK = 32 * MIB  # the plan's Python objects, logging, progress bar, late imports
MAX_READAHEAD = 16 * MIB
MIN_READAHEAD = 256 << 10
# A private local Ray, measured here: raylet + GCS + dashboard and runtime-env agents, and
# one worker process per CPU, each with torch imported.
RAY_DAEMONS = 560 * MIB
RAY_WORKER_PROCESS = 300 * MIB
RAY_MIN_OBJECT_STORE = 80 * MIB
# numba and the compiled kernels (recipe/rng.py, recipe/library/_fused.py), loaded by each
# process that runs a task-vector method (TIES, DARE, ...): 147-151 MiB of RSS measured here
# (numba 0.68, kernels from numba's cache).
NUMBA_KERNELS = 160 * MIB

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'400MB', '2GiB', '1.5G', '123' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size like 400MB or 2GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), if any."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value != "max" and int(value) < (1 << 60):
            return int(value)
    return None


def default_budget() -> int:
    budget = int(psutil.virtual_memory().available * DEFAULT_FRACTION)
    limit = cgroup_limit()
    if limit is not None:
        budget = min(budget, int(limit * CGROUP_FRACTION))
    return budget


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    process: int  # this process now, with slack
    workers: int
    chunk_elems: int
    per_worker: int
    readahead: int  # bytes hinted ahead per input and worker (page cache)
    ray: int = 0  # a private Ray's daemons and worker processes
    object_store: int = 0
    writer_inflight: int = 256 * MIB  # all tasks together, with Ray's writer sink
    cache_on_device: bool = False
    # Per worker: bytes of a tensor's inputs kept between a method's passes (worker.py). On
    # the CPU they are host memory, included in per_worker; None: the CUDA default, taken
    # where the workers run (default_tensor_cache).
    tensor_cache: int | None = 0

    @property
    def total(self) -> int:
        """What the merge's processes hold; readahead is reclaimable page cache, sized from what is left."""
        return self.process + self.workers * self.per_worker + self.ray + self.object_store

    def describe(self) -> str:
        return (f"memory budget {self.budget / MIB:.0f} MiB: this process {self.process / MIB:.0f} MiB, "
                f"{self.workers} workers x {self.per_worker / MIB:.1f} MiB (chunk {self.chunk_elems} elements)"
                + (f", Ray {self.ray / MIB:.0f} MiB + object store {self.object_store / MIB:.0f} MiB"
                   if self.ray else "")
                + f", readahead {self.readahead / MIB:.1f} MiB per input"
                + self._describe_cache())

    def _describe_cache(self) -> str:
        if self.tensor_cache is None:
            return ", tensor cache: half the free GPU memory, shared by the workers"
        if not self.tensor_cache:
            return ""
        where = "on the device" if self.cache_on_device else "included above"
        return f", tensor cache {self.tensor_cache / MIB:.0f} MiB per worker ({where})"


def per_worker_bytes(plan: Plan, chunk_elems: int, cuda: bool = False) -> int:
    """What one worker touches for a chunk of `chunk_elems` elements (copies move 4 x chunk bytes)."""
    in_size = max([DTYPES[s.dtype].bits // 8 for t in plan.tensors if t.op == "reduce" for s in t.sources] + [4])
    out_size = max([DTYPES[t.dtype].bits // 8 for t in plan.tensors] + [4])
    acc_size = max([DTYPES[t.accumulator].bits // 8 for t in plan.tensors if t.op == "reduce"] + [4])
    host = chunk_elems * (in_size * (2 if cuda else 1) + out_size)
    device = 0 if cuda else chunk_elems * acc_size * (2 + graph_chunks(plan))
    return host + device + graph_state_bytes(plan) + WORKER_SLACK


def cacheable_bytes(plan: Plan) -> int:
    """The most a worker's tensor cache can hold: the largest tensor_cache_need of the plan."""
    from .recipe.library import build
    from .worker import tensor_cache_need  # one rule for what the worker keeps

    built: dict[str, Method] = {}  # per distinct node call: a plan repeats few of them

    def method(call: NodeCall) -> Method:
        key = repr((call.method, call.params, call.base))
        if key not in built:
            built[key] = build(call.method, dict(call.params), base=call.base)
        return built[key]

    return max((tensor_cache_need(t, [method(c) for c in t.graph]) for t in plan.tensors if t.graph), default=0)


def default_tensor_cache(device: object, sharers: int) -> int:
    """The tensor cache of one worker when --tensor-cache-mb is not given: on CUDA, half the
    device's free memory shared by `sharers` workers (it costs no host memory); on the CPU
    none, since it would come out of the memory budget for little (README)."""
    import torch

    if torch.device(device).type != "cuda":
        return 0
    free, _total = torch.cuda.mem_get_info(device)
    return free // 2 // max(1, sharers)


def kernels_bytes(plan: Plan) -> int:
    """NUMBA_KERNELS when a method of the plan may run compiled kernels, else 0."""
    from .recipe.library import REGISTRY

    return NUMBA_KERNELS if any(REGISTRY[c.method].uses_kernels for t in plan.tensors for c in t.graph) else 0


def graph_chunks(plan: Plan) -> int:
    """Chunk buffers the largest recipe graph of the plan holds beyond the reduction's own:
    per node its value and its method's declared scratch (recipe.library's scratch_chunks)."""
    from .recipe.library import REGISTRY

    costs = {
        sum(1 + REGISTRY[call.method].scratch_chunks for call in t.graph)
        for t in plan.tensors
        if t.graph
    }
    return max(costs, default=0)


def graph_state_bytes(plan: Plan) -> int:
    """The statistics the largest recipe graph of the plan holds per tensor, on the host
    whatever the device (recipe.library's state_bytes, per node)."""
    from .recipe.library import REGISTRY

    return max((sum(REGISTRY[call.method].state_bytes for call in t.graph) for t in plan.tensors if t.graph),
               default=0)


def fit(
    plan: Plan,
    budget: int | None,
    *,
    workers: int,
    chunk_elems: int | None,
    default_chunk_elems: int,
    private_ray: bool,
    cuda: bool = False,
    object_store: int | None = None,
    writer_inflight: int | None = None,
    tensor_cache: int | None = None,
) -> MemoryPlan:
    """The largest configuration (up to the requested workers and chunk) within the budget."""
    budget = default_budget() if budget is None else budget
    process = psutil.Process().memory_info().rss + PROCESS_SLACK
    kernels = kernels_bytes(plan)
    if not private_ray and "numba" not in sys.modules:
        process += kernels  # local workers are this process's threads: loaded here, once
    chunk = chunk_elems or default_chunk_elems
    ray = 0
    store_floor = object_store or RAY_MIN_OBJECT_STORE
    n_files = max(1, len(plan.inputs))

    if tensor_cache is None and not cuda:
        tensor_cache = 0  # the default on the CPU
    # On the CPU the cache is host memory: charge what it can hold at most, not what was offered.
    host_cache = 0 if cuda or not tensor_cache else min(tensor_cache, cacheable_bytes(plan))

    def cost(w: int, c: int) -> int:
        worker = per_worker_bytes(plan, c, cuda) + host_cache
        extra = (RAY_DAEMONS + store_floor + w * (RAY_WORKER_PROCESS + kernels)) if private_ray else 0
        return process + w * worker + extra

    w = workers
    while w > 1 and cost(w, chunk) > budget:
        w -= 1
    if chunk_elems is None:  # shrink our default chunk before refusing; a chunk the user set is kept
        while chunk > MIN_CHUNK_ELEMS and cost(w, chunk) > budget:
            chunk //= 2
    need = cost(1, chunk if chunk_elems else MIN_CHUNK_ELEMS)
    if cost(w, chunk) > budget:
        what = "this process, a private Ray and one worker" if private_ray else "this process and one worker"
        raise BudgetError(
            f"--memory {budget / MIB:.0f} MiB is too small: the merge needs at least {math.ceil(need / MIB)} MiB "
            f"({what}; this process alone holds {process / MIB:.0f} MiB)"
        )
    worker = per_worker_bytes(plan, chunk, cuda) + host_cache
    store = 0
    if private_ray:
        ray = RAY_DAEMONS + w * (RAY_WORKER_PROCESS + kernels)
        store = object_store or min(512 * MIB, (budget - cost(w, chunk)) // 2 + RAY_MIN_OBJECT_STORE)
    left = budget - process - w * worker - ray - store
    readahead = int(min(MAX_READAHEAD, max(MIN_READAHEAD, left // (2 * n_files * w))))
    # Chunks on their way to the writer live in the object store: half of it by default, so
    # that they rarely spill; more is allowed, and then spilling (to --spill-dir) takes the rest.
    inflight = writer_inflight or (store // 2 if store else 256 * MIB)
    return MemoryPlan(budget, process, w, chunk, worker, readahead, ray, store, inflight,
                      cache_on_device=cuda, tensor_cache=tensor_cache)


class BudgetError(UsageError):
    """The memory budget cannot hold even the smallest configuration."""

