"""The journal of finished shards, beside the partial output, so that a merge whose driver
was killed resumes instead of starting over.

One JSON object a line: first the plan's digest and the shard target, then one line per
finished shard with the CRC-32 of the bytes it wrote. A resume trusts nothing it cannot
check: a shard is reused only if its bytes in the partial output still have that CRC.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from .formats.dtypes import DTYPES
from .plan import Plan
from .shards import Shard

log = logging.getLogger(__name__)


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.journal")


@dataclass(frozen=True)
class JournalEntry:
    shard: int
    crc32: int
    nbytes: int


class Journal:
    def __init__(self, path: Path, plan_digest: str, shard_target: int, keep: dict[int, JournalEntry]) -> None:
        """Start a journal at `path` holding `keep` (entries verified from an earlier run)."""
        self.path = path
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"plan": plan_digest, "shard_target": shard_target}) + "\n")
            for e in keep.values():
                f.write(json.dumps({"shard": e.shard, "crc32": e.crc32, "bytes": e.nbytes}) + "\n")
        os.replace(tmp, path)
        self._file = open(path, "a")  # noqa: SIM115 - kept open for the merge's lifetime

    def record(self, shard: int, crc32: int, nbytes: int) -> None:
        # flush, not fsync: a killed driver leaves the kernel's copy intact, and a resume
        # re-checks every CRC anyway (which also covers a machine that lost power).
        self._file.write(json.dumps({"shard": shard, "crc32": crc32, "bytes": nbytes}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def load_entries(path: Path, plan_digest: str, shard_target: int) -> dict[int, JournalEntry]:
    """Entries of an earlier run of the same plan; empty if there is none or it differs."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    try:
        head = json.loads(lines[0])
        if head != {"plan": plan_digest, "shard_target": shard_target}:
            log.warning("%s: journal is for another plan; starting over", path)
            return {}
        entries = {}
        for line in lines[1:]:
            obj = json.loads(line)
            entries[obj["shard"]] = JournalEntry(obj["shard"], obj["crc32"], obj["bytes"])
        return entries
    except (ValueError, KeyError, IndexError, TypeError):
        # A torn last line from a killed driver ends the usable part.
        log.warning("%s: journal is damaged; keeping the entries before the damage", path)
        return entries if "entries" in locals() else {}


def shard_output_ranges(plan: Plan, shard: Shard) -> list[tuple[int, int, int]]:
    """(file, begin, end) of every byte range the shard writes, in write order."""
    ranges = []
    for piece in shard.pieces:
        t = plan.tensors[piece.tensor]
        per_unit = DTYPES[t.dtype].bits // 8 if t.op == "reduce" else 1
        ranges.append((t.file, t.begin + piece.start * per_unit, t.begin + piece.stop * per_unit))
    return ranges


def verify(plan: Plan, shards: list[Shard], entries: dict[int, JournalEntry], files: list[str]) -> set[int]:
    """Shards whose bytes in the partial output match their journaled CRC."""
    good = set()
    fds = [os.open(f, os.O_RDONLY) for f in files]
    try:
        for index, entry in entries.items():
            if index >= len(shards):
                continue
            crc, total = 0, 0
            for file, begin, end in shard_output_ranges(plan, shards[index]):
                pos = begin
                while pos < end:
                    data = os.pread(fds[file], min(end - pos, 8 << 20), pos)
                    if not data:
                        break
                    crc = zlib.crc32(data, crc)
                    pos += len(data)
                total += pos - begin
            if crc == entry.crc32 and total == entry.nbytes:
                good.add(index)
    finally:
        for fd in fds:
            os.close(fd)
    return good
