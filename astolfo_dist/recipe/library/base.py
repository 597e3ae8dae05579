"""The one interface every merge method implements: streaming, chunk by chunk, in bounded memory.

A method turns N input tensors (same shape, flattened) into one output tensor without ever
holding a whole tensor or a stack of N chunks. The engine drives it per tensor:

    state = method.begin(key, numel, n_inputs)
    p = 0
    while not method.ready(state):                    # statistic passes (none for weighted sums)
        for start, in every chunk, in any order:      # may be split between workers, see below
            method.observe(state, p, start, read)
        method.end_pass(state, p)                     # fixes thresholds, angles, weights...
        p += 1
    for every chunk:                                  # any order, any worker, any chunk size
        method.output(state, start, read, out)        # out: the chunk's result, accumulator dtype

`read(i)` returns the current chunk of input i (elements [start, start + len)) as a 1-D float
tensor in the accumulator dtype (float32 or float64), read again from storage on each call.
The tensor is valid only until the next `read` call: a method copies what it must keep into
its own chunk-sized scratch. `out` has the chunk's length and the accumulator dtype.

Scratch. Chunk-sized temporaries come from `self.workspace` (recipe/workspace.py: views into
buffers reused from chunk to chunk and tensor to tensor), written with `out=` and in-place
operations, so that `observe` and `output` allocate nothing chunk-sized once the buffers
exist. A method made on its own has a workspace of its own; the worker replaces it with the
one it owns, shared by every method that worker runs. State that lives through a tensor's
passes but is not chunk-sized (the selections' histograms and bands) comes from
`self.state_workspace` where the worker lends one (a scope per graph node; the worker runs
one tensor's graph at a time, so one state per node is alive at once), so that it too is
allocated once per worker, not once per tensor and pass (fresh pages cost a fault and
zeroing each: TIES took 400 thousand faults). A method used on its own has none and
allocates its state per pass, so that any number of its states may be alive at once.

Passes. `tensor_passes` is an upper bound on the number of statistic passes (0: purely
elementwise, no state beyond the parameters). Some methods finish early, depending on the
data (an exact top-k selection stops when few candidates are left; Weiszfeld stops when
its weights settle), so the driver asks `ready(state)` after each `end_pass`.

Splitting a pass between workers. A state is a small picklable value (O(n_inputs) numbers,
or a few histograms of at most a few thousand counts per input, never O(numel); an exact
top-k selection's first pass also holds a band of candidates, within a fixed budget:
library/_select.py). To split
pass p, give every worker a copy (pickle / copy.deepcopy) of the state as it stood after
`begin` or the previous `end_pass`; each worker observes its chunks; the driver folds the
copies with `merge_states` and calls `end_pass` once (mid-pass, counts stay on the device
their chunks were on, so that a GPU need not wait for them per chunk; `merge_states` folds
them onto the first state's device). Every statistic is order-free and
exact: integer counts, exact (error-free, superaccumulator) sums of float64 terms, and sets
of candidates that are sorted before use. So the final state (but for how many passes it
took: the top-k selection's first-pass band may settle it early), and hence every output
bit, is the same for any chunk size, chunk order and split between workers. Only
`end_pass` runs scalar floating-point maths (square roots, arc cosines): it runs once, on
the driver, and its results travel inside the state.

Elementwise arithmetic in `output` uses only correctly rounded IEEE operations (add, sub,
mul, div, compare; no fused multiply-add, no reductions across elements), one fixed order
over the inputs, so an element's value depends on nothing but the inputs at that element
and the state.

Randomness (DARE, DELLA) comes from recipe/rng.py keyed by (seed, input index, tensor key,
absolute element index), so masks are independent of chunking too.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, NoReturn, TypeVar

import torch

from ...errors import UsageError
from ..workspace import Workspace

Read = Callable[[int], torch.Tensor]
"""read(i) -> chunk of input i, accumulator dtype, valid until the next call. A reader may
also offer read.source(i) (see read_source), read.rows (see read_rows) and read.format (see
chunk_format)."""


def read_rows(read: Read, inputs: list[int], store: torch.Tensor, slot: int) -> list[torch.dtype] | None:
    """Several inputs' chunks as read_source gives them, read into the uint8 `store` (the r-th
    at r * slot bytes) in one call, where the reader offers it (read.rows: the worker's, for
    inputs it reads from files in dtypes the CPU kernels widen); their dtypes. None where the
    reader does not, or not for all of these inputs (nothing is read then): read_source each."""
    rows = getattr(read, "rows", None)
    return None if rows is None else rows(inputs, store, slot)


def chunk_format(read: Read) -> tuple[int, torch.dtype, torch.device] | None:
    """The chunk's length, accumulator dtype and device, known before anything is read, where
    the reader offers them (the worker's does: read.format); else None."""
    return getattr(read, "format", None)


def read_source(read: Read, i: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """Input i's chunk before its conversion to the accumulator dtype, where the reader offers
    it (the worker does on the CPU, for the dtypes the CPU kernels widen exactly: float16 or
    bfloat16, or float32 into float64), else read(i). Valid until the next read; for the
    CPU kernels only, which read float16 and bfloat16 as they are (library/_fused._widen)
    and save the conversion's pass over the chunk. With `into` (contiguous bytes, uint8, room
    for the chunk in the accumulator dtype), a chunk read from a file is read there, and stays
    valid as long as `into` is not written; a chunk the reader holds already is returned as
    it is (the caller checks where it lies)."""
    source = getattr(read, "source", None)
    return read(i) if source is None else source(i, into)


# ---------------------------------------------------------------------------------------------
# Parameters


class Params:
    """Mixin for a method's frozen parameter dataclass: validation that names method and field.

    Subclasses are `@dataclass(frozen=True)` with defaults for every field, set `method`, and
    validate in `__post_init__` with the helpers below (which also normalise types: ints to
    floats, lists to tuples). `aliases` maps other accepted names (mergekit / sd-mecha
    spellings, Python keywords) to field names.
    """

    method: ClassVar[str] = "?"
    aliases: ClassVar[Mapping[str, str]] = {}

    def _fail(self, name: str, message: str) -> NoReturn:
        raise UsageError(f"{self.method}: parameter {name.rstrip('_')!r} {message}")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _real(
        self,
        name: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> float:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(name, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            self._fail(name, f"must be finite, got {value!r}")
        if lo is not None and (value < lo or (lo_open and value == lo)):
            self._fail(name, f"must be {'>' if lo_open else '>='} {lo}, got {value!r}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            self._fail(name, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")
        self._set(name, value)
        return value

    def _int(self, name: str, *, lo: int | None = None) -> int:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(name, f"must be an integer, got {value!r}")
        if lo is not None and value < lo:
            self._fail(name, f"must be >= {lo}, got {value!r}")
        return value

    def _bool(self, name: str, *, optional: bool = False) -> bool | None:
        value = getattr(self, name)
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self._fail(name, f"must be true or false, got {value!r}")
        return value

    def _choice(self, name: str, choices: Sequence[str]) -> str:
        value = getattr(self, name)
        if value not in choices:
            self._fail(name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def _weights(self, name: str) -> tuple[float, ...] | None:
        value = getattr(self, name)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            self._fail(name, f"must be a list of numbers, got {value!r}")
        out = []
        for w in value:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                self._fail(name, f"must hold finite numbers, got {w!r}")
            out.append(float(w))
        if not out:
            self._fail(name, "must not be empty")
        self._set(name, tuple(out))
        return tuple(out)


P = TypeVar("P", bound=Params)
S = TypeVar("S", bound="State")


# ---------------------------------------------------------------------------------------------
# Per-tensor state


@dataclass
class State:
    """What every per-tensor state carries; methods subclass it with their statistics.

    `pass_index` is the pass being run (== passes finished); `seen` counts the elements
    observed in this pass (summed by merge_states, checked against numel by end_pass, so a
    lost or doubled chunk is an error, not a silently wrong statistic).
    """

    key: str
    numel: int
    n_inputs: int
    pass_index: int = 0
    seen: int = 0
    done: bool = True


# ---------------------------------------------------------------------------------------------
# Methods


class Method(ABC, Generic[P, S]):
    """A merge method: typed parameters + per-tensor streaming passes + a chunk output.

    Class attributes describe the method: `name` (registry name), `params_type` (its frozen
    Params dataclass), `uses_base` (True: the constructor needs `base`, the index among the
    inputs of the base model that task vectors are taken against), and input-count bounds.
    """

    name: ClassVar[str]
    params_type: ClassVar[type[Params]]
    # Upper bound on the workspace a method fills, in chunk-sized buffers of the accumulator
    # dtype (bool and int masks counted by their bytes): the memory budget reserves it per
    # graph node and per worker (tests/test_workspace.py checks the bound).
    scratch_chunks: ClassVar[int] = 0
    # Upper bound on the bytes of statistics (histograms, candidates) a node's state holds for
    # one tensor, beyond its chunk buffers: the memory budget reserves it per graph node and worker.
    state_bytes: ClassVar[int] = 0
    uses_base: ClassVar[bool] = False
    # True: may run compiled CPU kernels (recipe/rng.py, library/_fused.py), which cost a
    # process budget.NUMBA_KERNELS of memory the first time (numba).
    uses_kernels: ClassVar[bool] = False
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int | None] = None

    def __init__(self, params: P | None = None, *, base: int | None = None) -> None:
        if params is None:
            params = self.params_type()  # type: ignore[assignment]
        if not isinstance(params, self.params_type):
            want, got = self.params_type.__name__, type(params).__name__
            raise UsageError(f"{self.name}: parameters must be {want}, got {got}")
        if self.uses_base:
            if base is None:
                raise UsageError(f"{self.name}: needs a base model (base=index of the base among the inputs)")
            if isinstance(base, bool) or not isinstance(base, int) or base < 0:
                raise UsageError(f"{self.name}: base must be a non-negative input index, got {base!r}")
        elif base is not None:
            raise UsageError(f"{self.name}: takes no base model, got base={base!r}")
        self.params: P = params  # type: ignore[assignment]
        self.base = base
        self.workspace = Workspace()  # chunk-sized scratch; the worker lends its own
        self.state_workspace: Workspace | None = None  # state buffers (in state_bytes), lent by the worker

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, *, base: int | None = None) -> Method:
        """Build from a plain mapping (a recipe's YAML), accepting the documented aliases."""
        names = {f.name for f in fields(cls.params_type)}
        kwargs: dict[str, Any] = {}
        for raw, value in (params or {}).items():
            name = cls.params_type.aliases.get(raw, raw)
            if name not in names:
                known = sorted({n.rstrip("_") for n in names} | set(cls.params_type.aliases))
                raise UsageError(f"{cls.name}: unknown parameter {raw!r}; known: {', '.join(known)}")
            if name in kwargs:
                raise UsageError(f"{cls.name}: parameter {name.rstrip('_')!r} given twice (as {raw!r})")
            kwargs[name] = value
        return cls(cls.params_type(**kwargs), base=base)

    # -- the interface ------------------------------------------------------------------------

    @property
    def tensor_passes(self) -> int:
        """Upper bound on the statistic passes over a whole tensor before output (0: none)."""
        return 0

    def begin(self, key: str, numel: int, n_inputs: int) -> S:
        """A fresh per-tensor state; raises UsageError if n_inputs does not suit the method."""
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        self.check_inputs(n_inputs)
        return self._begin(key, numel, n_inputs)

    def ready(self, state: S) -> bool:
        """True once no more statistic passes are needed: output may run."""
        return state.done

    def observe(self, state: S, pass_index: int, start: int, read: Read) -> None:
        """Fold the chunk starting at element `start` into the statistics of pass `pass_index`."""
        self._check_pass(state, pass_index)
        n = self._observe(state, start, read)
        if start < 0 or start + n > state.numel:
            raise ValueError(f"{self.name}: chunk [{start}, {start + n}) outside a tensor of {state.numel}")
        state.seen += n

    def end_pass(self, state: S, pass_index: int) -> None:
        """Close pass `pass_index` once every chunk was observed (in this state or merged into it)."""
        self._check_pass(state, pass_index)
        if state.seen != state.numel:
            raise ValueError(
                f"{self.name}: pass {pass_index} of {state.key!r} observed {state.seen} elements, "
                f"expected {state.numel}"
            )
        self._end_pass(state)
        state.pass_index += 1
        state.seen = 0
        if not state.done and state.pass_index >= self.tensor_passes:
            raise RuntimeError(f"{self.name}: still not ready after {state.pass_index} passes")

    def merge_states(self, a: S, b: S) -> S:
        """Combine two partial states of the same pass (copies of one state that observed
        disjoint chunk sets). Returns the combined state (may be `a`, updated)."""
        if (a.key, a.numel, a.n_inputs, a.pass_index) != (b.key, b.numel, b.n_inputs, b.pass_index):
            raise ValueError(f"{self.name}: cannot merge states of different tensors or passes")
        if a.done:
            raise ValueError(f"{self.name}: the state needs no pass; nothing to merge")
        self._merge(a, b)
        a.seen += b.seen
        return a

    def output_at_once(self, key: str, numel: int, n_inputs: int, read: Read, out: torch.Tensor) -> bool:
        """Optional, for a tensor read as one chunk (`read`, `out`: all of it): its statistics
        and its output in one step, begin to output, each input read once where the passes
        would read it again; the same output bytes. False (nothing read): none here."""
        return False

    @abstractmethod
    def output(self, state: S, start: int, read: Read, out: torch.Tensor) -> None:
        """Write the result for elements [start, start + len(out)) into `out` (accumulator dtype)."""

    # -- hooks for subclasses -----------------------------------------------------------------

    def check_inputs(self, n_inputs: int) -> None:
        if n_inputs < self.min_inputs or (self.max_inputs is not None and n_inputs > self.max_inputs):
            if self.max_inputs == self.min_inputs:
                want = f"exactly {self.min_inputs}"
            elif self.max_inputs is None:
                want = f"at least {self.min_inputs}"
            else:
                want = f"{self.min_inputs} to {self.max_inputs}"
            raise UsageError(f"{self.name}: needs {want} input models, got {n_inputs}")
        if self.base is not None and self.base >= n_inputs:
            raise UsageError(f"{self.name}: base index {self.base} is out of range for {n_inputs} inputs")

    def _begin(self, key: str, numel: int, n_inputs: int) -> S:
        return State(key, numel, n_inputs)  # type: ignore[return-value]

    def _observe(self, state: S, start: int, read: Read) -> int:
        raise RuntimeError(f"{self.name}: needs no statistic pass")

    def _end_pass(self, state: S) -> None:
        raise RuntimeError(f"{self.name}: needs no statistic pass")

    def _merge(self, a: S, b: S) -> None:
        raise RuntimeError(f"{self.name}: needs no statistic pass")

    def _check_pass(self, state: S, pass_index: int) -> None:
        if state.done:
            raise RuntimeError(f"{self.name}: {state.key!r} needs no more passes")
        if pass_index != state.pass_index:
            raise ValueError(f"{self.name}: pass {pass_index} given, the state is at pass {state.pass_index}")

    def others(self, n_inputs: int) -> list[int]:
        """Input indices other than the base, in input order."""
        return [i for i in range(n_inputs) if i != self.base]

    def __repr__(self) -> str:
        base = "" if self.base is None else f", base={self.base}"
        return f"{type(self).__name__}({self.params!r}{base})"


def cpu_kernels(*tensors: torch.Tensor, source: torch.Tensor | None = None) -> Any:
    """recipe.library._fused when its compiled kernels take these tensors (contiguous, on the
    CPU, of one float dtype) and, if given, `source`, an input chunk as read (read_source) for
    a pass in their dtype; else None (a GPU: the torch path). numba is imported here, on the
    first call with CPU tensors: only where a kernel will run."""
    if any(t.device.type != "cpu" for t in (*tensors, *(() if source is None else (source,)))):
        return None
    from . import _fused

    if not _fused.supported(*tensors):
        return None
    return _fused if source is None or _fused.takes_source(source, tensors[0]) else None


WIDENED = frozenset({(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                     (torch.float16, torch.float64), (torch.bfloat16, torch.float64),
                     (torch.float32, torch.float64)})
"""(source dtype, accumulator dtype) pairs the CPU kernels read as they are: the source's
values are exactly the accumulator's after conversion."""


def divide_(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x /= divisor, in place, as an IEEE division of x's dtype on every device.

    On CUDA, div_ by a Python number multiplies by its reciprocal (torch's
    div_true_kernel_cuda), one ulp off the CPU's quotient for a quarter of the elements when
    dividing by 0.3; a divisor tensor on x's device is divided by, as on the CPU."""
    # Filled in float64, then cast: a divisor beyond x's range becomes inf, as div_ would have it.
    return x.div_(torch.full((), divisor, dtype=torch.float64, device=x.device).to(x.dtype))


def input_weights(method: str, weights: tuple[float, ...] | None, count: int) -> tuple[float, ...]:
    """`weights` checked against the number of inputs they apply to (None: all 1.0)."""
    if weights is None:
        return (1.0,) * count
    if len(weights) != count:
        raise UsageError(f"{method}: parameter 'weights' has {len(weights)} values for {count} input models")
    return weights
