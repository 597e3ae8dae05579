"""Progress on stderr (bytes read, rate, ETA) when it is a terminal; silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(total: int, enabled: bool | None = None) -> Iterator[Callable[[int], None]]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        yield bar.update  # tqdm.update takes its own lock: safe from worker threads
    finally:
        bar.close()
