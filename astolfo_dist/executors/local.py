"""In-process executor: a thread pool. Reads (preadv) and torch kernels release the GIL,
so threads give real parallelism without copying the plan into other processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed

import torch

from ..shards import Shard
from ..worker import ChunkBuffers, ShardResult, WorkerContext, run_shard

OnShardDone = Callable[[ShardResult], None]


def run_local(ctx: WorkerContext, shards: list[Shard], workers: int, on_done: OnShardDone) -> list[ShardResult]:
    """Run every shard; `on_done` is called in the calling thread as each one finishes."""
    local = threading.local()

    def task(shard: Shard) -> ShardResult:
        buffers = getattr(local, "buffers", None)
        if buffers is None:
            buffers = local.buffers = ChunkBuffers(ctx.chunk_elems, ctx.device)
        return run_shard(ctx, shard, buffers)

    # The workers are the parallelism: torch's own intra-op threads on top of them would
    # oversubscribe the cores, so they are turned off for the duration of the merge.
    torch_threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="astolfo-worker") as pool:
            futures: list[Future[ShardResult]] = [pool.submit(task, s) for s in shards]
            try:
                results = []
                for future in as_completed(futures):
                    result = future.result()
                    on_done(result)
                    results.append(result)
                return results
            except BaseException:
                # Ctrl-C or a failed shard: stop the others at their next chunk.
                ctx.cancel.set()
                for f in futures:
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(torch_threads)
