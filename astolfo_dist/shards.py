"""Shards: the plan's tensors cut into byte-balanced units of scheduling.

A shard is a run of pieces (a tensor, or an element range of one) whose input bytes add
up to about the target. The cut depends only on the plan, not on the number of workers,
so a shard means the same thing to every executor (and, later, to a resume journal).
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan

MIN_SHARD_BYTES = 8 << 20
MAX_SHARD_BYTES = 512 << 20
SHARDS_PER_PLAN = 64


@dataclass(frozen=True, slots=True)
class Piece:
    tensor: int  # index into plan.tensors
    start: int  # in the tensor's units (elements to reduce, bytes to copy)
    stop: int


@dataclass(frozen=True)
class Shard:
    index: int
    pieces: tuple[Piece, ...]
    read_bytes: int


def shard_target(plan: Plan) -> int:
    return min(MAX_SHARD_BYTES, max(MIN_SHARD_BYTES, plan.read_bytes // SHARDS_PER_PLAN))


def make_shards(plan: Plan, target_bytes: int | None = None) -> list[Shard]:
    target = target_bytes or shard_target(plan)
    shards: list[Shard] = []
    pieces: list[Piece] = []
    cost = 0.0

    def close() -> None:
        nonlocal pieces, cost
        if pieces:
            shards.append(Shard(len(shards), tuple(pieces), int(cost)))
        pieces, cost = [], 0.0

    for index, tensor in enumerate(plan.tensors):
        per_unit = max(tensor.read_bytes_per_unit(), 1e-9)
        start, units = 0, tensor.units
        if units == 0:
            pieces.append(Piece(index, 0, 0))
            continue
        if tensor.graph:
            # Library methods stream over the whole tensor (statistic passes, then output)
            # inside one task, so its state never travels: one piece, whatever its size.
            pieces.append(Piece(index, 0, units))
            cost += units * per_unit
            if cost >= target:
                close()
            continue
        while start < units:
            room = max(1, int((target - cost) / per_unit))
            stop = min(units, start + room)
            pieces.append(Piece(index, start, stop))
            cost += (stop - start) * per_unit
            start = stop
            if cost >= target:
                close()
    close()
    return shards
