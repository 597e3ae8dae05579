"""Reusable chunk-sized scratch buffers for merge methods.

A method's `observe` and `output` need a few chunk-sized temporaries (the base chunk, a
delta, masks, partial sums). Allocating them per chunk costs time, and worse, memory: the
allocator keeps much of what such temporaries free, so a process's peak grows with the
number of inputs and tensors instead of staying at a few chunks. A `Workspace` hands out
views into buffers that live as long as the workspace and grow only when a larger view is
asked for:

    ws.buffer("delta", torch.float32, n, device)   # a view of n elements, contents undefined

One buffer exists per (tag, dtype, device): two calls with the same tag return views of the
same memory, so a tag names one temporary whose lifetime must not overlap another use of the
same tag. The worker owns one workspace per worker thread and lends it to every method it
runs (`Method.workspace`); a method used on its own gets a fresh one. `scope(prefix)` gives a
view of the same workspace whose tags are prefixed: several method instances evaluated by one
worker each get a namespace of their own, so their temporaries never alias.

With `capacity` (the worker's chunk length), a buffer is allocated at that length the first
time its tag is used, so a worker allocates each buffer once; pages a small tensor never
touches cost no memory. Without it, buffers grow to the next power of two of what is asked,
or with `exact`, to what is asked: for state whose sizes are budgeted (the selections'
histograms and bands), where rounding up would spend the budget's headroom.
"""

from __future__ import annotations

import torch


class Workspace:
    """Scratch buffers keyed by (tag, dtype, device); see the module docstring."""

    def __init__(self, capacity: int = 0, exact: bool = False) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.exact = exact
        self._prefix = ""
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def buffer(self, tag: str, dtype: torch.dtype, n: int, device: torch.device | str) -> torch.Tensor:
        """A 1-D view of `n` elements of the buffer named `tag`; its contents are undefined."""
        if n < 0:
            raise ValueError(f"buffer length must be >= 0, got {n}")
        device = torch.device(device)
        key = (self._prefix + tag, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            if self.capacity:
                size = max(n, self.capacity)
            else:
                size = n if self.exact else 1 << max(0, n - 1).bit_length()
            del buf  # drop our reference before allocating the larger one
            buf = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:n]

    def like(self, tag: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`buffer` with the length and device of the 1-D tensor `x` (and its dtype by default)."""
        return self.buffer(tag, x.dtype if dtype is None else dtype, x.numel(), x.device)

    def scope(self, prefix: str) -> Workspace:
        """The same buffers seen through tags prefixed with `prefix` (a namespace for one user)."""
        view = Workspace.__new__(Workspace)
        view.capacity = self.capacity
        view.exact = self.exact
        view._prefix = f"{self._prefix}{prefix}/"
        view._buffers = self._buffers
        return view

    def nbytes(self) -> int:
        """Bytes allocated by the buffers (all scopes together)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Free every buffer (all scopes together)."""
        self._buffers.clear()

    def __reduce__(self) -> tuple[type[Workspace], tuple[int, bool]]:
        # Scratch has no meaning elsewhere: a pickled or copied workspace arrives empty.
        return (Workspace, (self.capacity, self.exact))

    def __repr__(self) -> str:
        return f"Workspace({len(self._buffers)} buffers, {self.nbytes()} bytes, prefix={self._prefix!r})"
