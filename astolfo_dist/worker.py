"""The worker: run one shard. For every chunk of every piece, read the chunk of each input
the plan names, reduce it on the worker's device, cast to the output dtype, write it.

Memory is the worker's buffers, sized by the chunk, whatever the number of inputs or the
size of the tensors: inputs are streamed one at a time into one reused read buffer.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import MergeCancelled
from .formats.dtypes import DTYPES, DType
from .formats.readers import RangeReader
from .plan import Plan, PlannedTensor, Source
from .recipe.library.base import WIDENED, Method, State
from .recipe.methods import weighted_sum
from .recipe.workspace import Workspace
from .shards import Shard


class Sink(Protocol):
    def write(self, file: int, offset: int, data: memoryview) -> None: ...


@dataclass
class ShardResult:
    shard: int
    read_bytes: int = 0
    written_bytes: int = 0
    crc32: int = 0  # of the shard's output bytes in write order: lets a resume verify them
    warnings: list[str] = field(default_factory=list)


@dataclass
class WorkerContext:
    plan: Plan
    readers: Mapping[str, RangeReader]
    sink: Sink
    chunk_elems: int
    device: torch.device
    cancel: threading.Event
    on_progress: Callable[[int], None] | None = None
    readahead: int = 16 << 20  # bytes hinted ahead per input, from the memory budget
    tensor_cache: int = 0  # bytes of one tensor's inputs a multi-pass method may keep on the device


class HostBuffer:
    """A reusable host buffer with its byte view and typed views made once: per-chunk
    Python work is the engine's overhead on the many small tensors of a checkpoint."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.bytes = memoryview(self.tensor.numpy())
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def typed(self, dt: DType, n: int) -> torch.Tensor:
        view = self._typed.get(dt.torch_dtype)
        if view is None:
            usable = len(self.bytes) // dt.itemsize * dt.itemsize
            view = self._typed[dt.torch_dtype] = self.tensor[:usable].view(dt.torch_dtype)
        return view[:n]


class ChunkBuffers:
    """One worker's reusable buffers. Host buffers are pinned when reducing on CUDA so that
    host-to-device copies run asynchronously; two read buffers alternate so the next
    input is read from disk while the previous one is copied and reduced."""

    def __init__(self, chunk_elems: int, device: torch.device) -> None:
        self.chunk_elems = chunk_elems
        self.device = device
        self.cuda = device.type == "cuda"
        raw_bytes = chunk_elems * 8  # the widest dtype; pages never touched cost nothing
        self.raw = [HostBuffer(raw_bytes, self.cuda) for _ in range(2 if self.cuda else 1)]
        self.out = HostBuffer(raw_bytes, self.cuda)
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._prefetched: dict[int, int] = {}  # reader -> end of the last readahead hint
        self._work: dict[object, tuple[torch.Tensor, ...]] = {}
        # Library methods' scratch, lent to every method this worker runs (allocated on first use).
        self.workspace = Workspace(chunk_elems)
        # And their state buffers (recipe.library.base), at the sizes asked: they are budgeted.
        self.state_workspace = Workspace(exact=True)

    def readahead(self, reader: RangeReader, offset: int, length: int) -> None:
        """Ask for the next `length` bytes, in windows: one hint per window, not per chunk."""
        key = id(reader)
        end = self._prefetched.get(key, -1)
        in_window = end - length <= offset <= end
        if in_window and end - offset >= length // 2:
            return  # at least half a window is already on its way
        begin = end if in_window else offset
        reader.prefetch(begin, offset + length - begin)
        self._prefetched[key] = offset + length

    def work(self, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulator and scratch, `n` elements of `dtype`, on the device."""
        if dtype not in self._work:
            self._work[dtype] = (
                torch.empty(self.chunk_elems, dtype=dtype, device=self.device),
                torch.empty(self.chunk_elems, dtype=dtype, device=self.device),
            )
        acc, tmp = self._work[dtype]
        return acc[:n], tmp[:n]

    def node_values(self, dtype: torch.dtype, count: int) -> list[torch.Tensor]:
        """One chunk buffer per node of a recipe graph, on the device, reused across tensors."""
        key = (dtype, "nodes")
        have = list(self._work.get(key, ()))
        while len(have) < count:
            have.append(torch.empty(self.chunk_elems, dtype=dtype, device=self.device))
        self._work[key] = tuple(have)
        return have[:count]

    def device_out(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        """The output chunk on the device (CUDA only), before its copy to pinned memory."""
        key = (dtype, "out")
        if key not in self._work:
            self._work[key] = (torch.empty(self.chunk_elems, dtype=dtype, device=self.device),) * 2
        return self._work[key][0][:n]


def run_shard(ctx: WorkerContext, shard: Shard, buffers: ChunkBuffers) -> ShardResult:
    result = ShardResult(shard.index)
    for piece in shard.pieces:
        tensor = ctx.plan.tensors[piece.tensor]
        if tensor.graph:
            _method_tensor(ctx, tensor, buffers, result)
            continue
        step = ctx.chunk_elems if tensor.op == "reduce" else ctx.chunk_elems * 4
        for start in range(piece.start, piece.stop, step):
            if ctx.cancel.is_set():
                raise MergeCancelled("merge cancelled")
            stop = min(piece.stop, start + step)
            if tensor.op == "reduce":
                read = _reduce_chunk(ctx, tensor, start, stop, piece.stop, buffers, result)
            else:
                read = _copy_chunk(ctx, tensor, start, stop, buffers, result)
            result.read_bytes += read
            if ctx.on_progress:
                ctx.on_progress(read)
    return result


def _read_chunks(
    ctx: WorkerContext, sources: tuple[Source, ...], start: int, n: int, ahead: int, buffers: ChunkBuffers
) -> Iterator[torch.Tensor]:
    """Yield each input's chunk as a tensor on the device, in recipe order, and ask the
    kernel to read the next `ahead` elements of each input in the background: several
    workers share one descriptor per file, which defeats the kernel's own readahead."""
    for i, src in enumerate(sources):
        dt = DTYPES[src.dtype]
        nbytes = n * dt.itemsize
        slot = i % len(buffers.raw)
        host = buffers.raw[slot]
        if buffers.cuda:
            event = buffers.events[slot]
            if event is not None:
                event.synchronize()  # the copy out of this pinned buffer has finished
        reader = ctx.readers[src.file]
        offset = src.offset + start * dt.itemsize
        reader.read_into(offset, host.bytes[:nbytes])
        if ahead:
            buffers.readahead(reader, offset + nbytes, min(ahead * dt.itemsize, ctx.readahead))
        x = host.typed(dt, n)
        if buffers.cuda:
            x = x.to(buffers.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            buffers.events[slot] = event
        yield x


def _emit(ctx: WorkerContext, tensor: PlannedTensor, offset: int, data: memoryview, result: ShardResult) -> None:
    ctx.sink.write(tensor.file, tensor.begin + offset, data)
    result.crc32 = zlib.crc32(data, result.crc32)
    result.written_bytes += len(data)


def _reduce_chunk(
    ctx: WorkerContext,
    tensor: PlannedTensor,
    start: int,
    stop: int,
    piece_stop: int,
    buffers: ChunkBuffers,
    result: ShardResult,
) -> int:
    n = stop - start
    if n == 0:
        return 0
    out_dt = DTYPES[tensor.dtype]
    acc, tmp = buffers.work(DTYPES[tensor.accumulator].torch_dtype, n)
    method = weighted_sum(tensor.weights)
    ahead = min(piece_stop - stop, n)
    host_out = buffers.out.typed(out_dt, n)
    with torch.cuda.stream(buffers.stream) if buffers.stream is not None else nullcontext():
        chunks = _read_chunks(ctx, tensor.sources, start, n, ahead, buffers)
        if buffers.cuda:
            device_out = buffers.device_out(out_dt.torch_dtype, n)
            method.reduce(acc, tmp, chunks, device_out)
            host_out.copy_(device_out, non_blocking=True)
            buffers.stream.synchronize()
        else:
            method.reduce(acc, tmp, chunks, host_out)
    nbytes = n * out_dt.itemsize
    _emit(ctx, tensor, start * out_dt.itemsize, buffers.out.bytes[:nbytes], result)
    return sum(n * DTYPES[s.dtype].itemsize for s in tensor.sources)


def tensor_cache_need(tensor: PlannedTensor, methods: Sequence[Method]) -> int:
    """The bytes a worker's tensor cache needs to keep this tensor's inputs between passes;
    0 when its methods make no statistic pass (nothing is read twice, nothing is kept)."""
    if not any(m.tensor_passes for m in methods):
        return 0
    return math.ceil(tensor.numel * tensor.read_bytes_per_unit())


class _TensorGraph:
    """One key's recipe graph (plan.NodeCall) on one worker: node values computed chunk by
    chunk when a reader asks for them, fused, never a whole intermediate tensor.

    Values are the tensor's sources, then the nodes' outputs. A source's chunk is re-read
    into the one leaf scratch on every request (or copied there from the tensor cache, see
    __init__); a node's chunk is computed into that node's own chunk buffer and kept there
    until another chunk of it is asked for, so a reader that takes the same input twice (a
    two-sweep method, a node read by two others) does not recompute it. That relies on
    methods never writing into what `read` returns.
    """

    def __init__(self, ctx: WorkerContext, tensor: PlannedTensor, buffers: ChunkBuffers) -> None:
        from .recipe.library import build

        self.ctx, self.tensor, self.calls = ctx, tensor, tensor.graph
        self.methods = [build(c.method, dict(c.params), base=c.base) for c in self.calls]
        for j, method in enumerate(self.methods):  # each node its own scratch namespace
            method.workspace = buffers.workspace.scope(str(j))
            method.state_workspace = buffers.state_workspace.scope(str(j))
        self.states: list[State | None] = [None] * len(self.calls)
        self.n_sources = len(tensor.sources)
        acc_dtype = DTYPES[tensor.accumulator].torch_dtype
        self.leaf = buffers.work(acc_dtype, ctx.chunk_elems)[0]
        self.host = buffers.raw[0]
        self.values = buffers.node_values(acc_dtype, len(self.calls))
        self.holds: list[tuple[int, int] | None] = [None] * len(self.calls)  # (start, n) in values[j]
        self.read_bytes = 0
        # Statistic passes read every input again (TIES: three times in all). Where the
        # tensor's inputs fit in the cache whole, the chunks read in the first pass are kept
        # on the device, in their own dtype, until the tensor is done: each byte is read
        # once. All or nothing: a partial cache would still re-read for every pass.
        need = tensor_cache_need(tensor, self.methods)
        self.kept: dict[tuple[int, int, int], torch.Tensor] | None = {} if 0 < need <= ctx.tensor_cache else None

    def settle(self) -> None:
        """Run every node's statistic passes, inputs first (the graph is in evaluation order)."""
        numel, step = self.tensor.numel, self.ctx.chunk_elems
        for j, (call, method) in enumerate(zip(self.calls, self.methods, strict=True)):
            state = method.begin(self.tensor.name, numel, len(call.args))
            for pass_index in range(method.tensor_passes + 1):
                if method.ready(state):
                    break
                for start in range(0, numel, step):
                    method.observe(state, pass_index, start, self._reader(j, start, min(step, numel - start)))
                method.end_pass(state, pass_index)
            if not method.ready(state):
                raise RuntimeError(f"{call.method} on {self.tensor.name}: not ready after "
                                   f"{method.tensor_passes} passes")
            self.states[j] = state

    def output_at_once(self) -> torch.Tensor | None:
        """The tensor's output where its one node computes it in one step (Method.output_at_once:
        a tensor of one chunk, its inputs not cached), else None: settle, then output."""
        numel = self.tensor.numel
        if len(self.calls) != 1 or numel > self.ctx.chunk_elems or self.kept is not None:
            return None
        out = self.values[0][:numel]
        self.holds[0] = None  # its value buffer takes the output
        method = self.methods[0]
        if not method.output_at_once(self.tensor.name, numel, len(self.calls[0].args), self._reader(0, 0, numel), out):
            return None
        return out

    def output(self, start: int, n: int) -> torch.Tensor:
        """The last node's value for elements [start, start + n): the tensor's output chunk."""
        return self._value(self.n_sources + len(self.calls) - 1, start, n)

    def _reader(self, j: int, start: int, n: int) -> _ChunkRead:
        return _ChunkRead(self, self.calls[j].args, start, n)

    def _source(self, v: int, start: int, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """A source's chunk as read, in its own dtype, where the CPU kernels can take it that way
        (recipe.library.base.read_source): no conversion pass; read into `into` if given. Else,
        and for nodes, _value."""
        dtype = DTYPES[self.tensor.sources[v].dtype].torch_dtype if v < self.n_sources else None
        if dtype is None or self.leaf.device.type != "cpu" or (
                dtype != self.leaf.dtype and (dtype, self.leaf.dtype) not in WIDENED):
            return self._value(v, start, n)
        return self._stored(v, start, n, into)

    def _rows(self, vs: list[int], start: int, n: int, store: torch.Tensor, slot: int) -> list[torch.dtype] | None:
        """Sources vs' chunks in their own dtypes, read from their files into the uint8 store's rows
        of `slot` bytes (base.read_rows): the per-input Python of _source left out. None (nothing
        read) for a node's value, a cached tensor, a dtype the CPU kernels do not widen, a GPU,
        or rows that do not fit (a chunk wider than `slot`, or the store shorter than the rows)."""
        if self.kept is not None or self.leaf.device.type != "cpu" or any(v >= self.n_sources for v in vs):
            return None
        if store.dtype != torch.uint8 or store.device.type != "cpu" or not store.is_contiguous():
            raise ValueError(f"rows: the store is {store.dtype} on {store.device}, not contiguous CPU bytes")
        sources = [self.tensor.sources[v] for v in vs]
        dtypes = [DTYPES[src.dtype] for src in sources]
        if any((dt.torch_dtype != self.leaf.dtype and (dt.torch_dtype, self.leaf.dtype) not in WIDENED)
               or n * dt.itemsize > slot for dt in dtypes) or len(vs) * slot > store.numel():
            return None
        if self.ctx.cancel.is_set():
            raise MergeCancelled("merge cancelled")
        room = memoryview(store.numpy())
        for r, (src, dt) in enumerate(zip(sources, dtypes, strict=True)):
            nbytes = n * dt.itemsize
            self.ctx.readers[src.file].read_into(src.offset + start * dt.itemsize, room[r * slot : r * slot + nbytes])
            self.read_bytes += nbytes
        return [dt.torch_dtype for dt in dtypes]

    def _value(self, v: int, start: int, n: int) -> torch.Tensor:
        if v < self.n_sources:  # to the device and the accumulator dtype
            return self.leaf[:n].copy_(self._stored(v, start, n))
        if self.ctx.cancel.is_set():
            raise MergeCancelled("merge cancelled")
        j = v - self.n_sources
        out = self.values[j][:n]
        if self.holds[j] != (start, n):
            self.holds[j] = None  # half-written if the method raises
            self.methods[j].output(self.states[j], start, self._reader(j, start, n), out)
            self.holds[j] = (start, n)
        return out

    def _stored(self, v: int, start: int, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Source v's chunk in its own dtype: from the tensor cache (kept there on the device the
        first time, see __init__), else read (into `into` if given, else the host buffer)."""
        if self.ctx.cancel.is_set():
            raise MergeCancelled("merge cancelled")
        if self.kept is None:
            return self._read(v, start, n, into)
        kept = self.kept.get((v, start, n))
        if kept is None:
            kept = self.kept[(v, start, n)] = self._read(v, start, n).to(self.leaf.device, copy=True)
        return kept

    def _read(self, v: int, start: int, n: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start + n) of source v, in its own dtype, in the host buffer (or in
        `into`, uint8 bytes)."""
        src = self.tensor.sources[v]
        dt = DTYPES[src.dtype]
        nbytes = n * dt.itemsize
        target = self.host.bytes[:nbytes] if into is None else memoryview(into[:nbytes].numpy())
        self.ctx.readers[src.file].read_into(src.offset + start * dt.itemsize, target)
        self.read_bytes += nbytes
        return self.host.typed(dt, n) if into is None else into[:nbytes].view(dt.torch_dtype)


@dataclass(frozen=True)
class _ChunkRead:
    """One node's recipe.library.base.Read for one chunk: read(i), read.source(i), read.rows,
    read.format."""

    graph: _TensorGraph
    args: tuple[int, ...]
    start: int
    n: int

    def __call__(self, i: int) -> torch.Tensor:
        return self.graph._value(self.args[i], self.start, self.n)

    def source(self, i: int, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.graph._source(self.args[i], self.start, self.n, into)

    def rows(self, inputs: list[int], store: torch.Tensor, slot: int) -> list[torch.dtype] | None:
        return self.graph._rows([self.args[i] for i in inputs], self.start, self.n, store, slot)

    @property
    def format(self) -> tuple[int, torch.dtype, torch.device]:
        return self.n, self.graph.leaf.dtype, self.graph.leaf.device


def _method_tensor(ctx: WorkerContext, tensor: PlannedTensor, buffers: ChunkBuffers, result: ShardResult) -> None:
    """A tensor computed by recipe.library methods: every node's statistic passes over every
    chunk (states stay O(inputs), never O(elements)), then the output chunk by chunk; or, for
    a tensor of one chunk whose method offers it (Method.output_at_once), both in one step."""
    graph = _TensorGraph(ctx, tensor, buffers)
    out_dt = DTYPES[tensor.dtype]
    at_once = graph.output_at_once()
    if at_once is None:
        graph.settle()
    for start in range(0, tensor.numel, ctx.chunk_elems):
        n = min(ctx.chunk_elems, tensor.numel - start)
        host_out = buffers.out.typed(out_dt, n)
        host_out.copy_(graph.output(start, n) if at_once is None else at_once)
        _emit(ctx, tensor, start * out_dt.itemsize, buffers.out.bytes[: n * out_dt.itemsize], result)
    result.read_bytes += graph.read_bytes
    if ctx.on_progress:
        ctx.on_progress(graph.read_bytes)


def _copy_chunk(
    ctx: WorkerContext, tensor: PlannedTensor, start: int, stop: int, buffers: ChunkBuffers, result: ShardResult
) -> int:
    """Copy bytes [start, stop) of the first source; compare the other inputs' bytes to it."""
    n = stop - start
    if n == 0:
        return 0
    first, others = tensor.sources[0], tensor.sources[1:]
    data = buffers.out.bytes[:n]
    ctx.readers[first.file].read_into(first.offset + start, data)
    read = n
    for src in others:
        if src.dtype != first.dtype:
            continue  # the plan already warned about this key
        other = buffers.raw[0].bytes[:n]
        ctx.readers[src.file].read_into(src.offset + start, other)
        read += n
        if other != data:
            name = ctx.plan.models[src.model].name
            msg = f"{tensor.name}: {name} differs from {ctx.plan.models[first.model].name}; kept the latter"
            if msg not in result.warnings:
                result.warnings.append(msg)
    _emit(ctx, tensor, start, data, result)
    return read

