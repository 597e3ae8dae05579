"""One-pass CPU kernels (numba) for the task-vector methods' per-input work, and the Philox
generator behind rng.py (at the end: numba's cache keeps them in one file, see KERNEL).

On a GPU each step is a torch kernel; on the CPU each torch operation is a pass over the
chunk in memory, and the output of TIES ran about twenty of them per input element (sub, the
top-k mask, the keep AND, then sign election's sums, NaN cleaning, clamps and weight counts).
These do the same arithmetic, bit for bit, in one pass over cache-sized tiles (NaN payloads
aside: where both operands of a subtraction are NaN, torch keeps the second's payload and these
the first's; a NaN stays a NaN in the same place, and the merge's final add of the base makes
the payload the base's again on both paths): hand-written
because no library fuses torch CPU operations without a C++ compiler at run time. They read
float16 and bfloat16 inputs as stored (`_widen`, `source_array`: no float32 copy of each input),
and TIES's output takes a group of inputs per pass (`topk_sides_group`). Imported on
first use (numba costs ~115 MiB of RSS, budget.NUMBA_KERNELS); tests pin each to its torch
path (tests/test_methods.py).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..rng import keep_thresholds, kernel_takes
from ..stats import _PATTERNS
from .base import WIDENED

TILE = 4096  # elements per tile of most kernels: its scratch (16 KiB of words or float32) stays in L1
WORDS_PER_BLOCK = 4  # uint32 outputs of one Philox-4x32 block
# Compiled once per machine and cached on disk; numba checks a kernel's cache against its own
# file only, so every kernel and intrinsic that another calls lives in this file (the Philox
# generator included: rng.py's masks and DARE's and DELLA's deltas read inputs through _widen).
# GIL released; IEEE arithmetic (x / 0 is inf or NaN, as in torch, not an exception).
KERNEL = dict(cache=True, nogil=True, error_model="numpy")


# Bit casts and the widening of 16-bit floats, as numba intrinsics: numba has no scalar bit cast
# (the kernels went through an integer view of a scratch tile, a store and a load per element)
# and no float16 on the CPU. Each compiles to a few vector instructions; they live in this
# file because numba's on-disk cache checks a kernel against its own file only.
_F32, _I32 = ir.FloatType(), ir.IntType(32)


@intrinsic
def _float_bits(typingctx, v):  # pragma: no cover (compiled)
    """A float32 or float64's bit pattern, as int32 or int64."""
    ints = {types.float32: types.int32, types.float64: types.int64}.get(v)
    if ints is None:
        return None
    return ints(v), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(ints.bitwidth))


@intrinsic
def _lowest_set(typingctx, bits):  # pragma: no cover (compiled)
    """The index of the lowest set bit of a uint64 that is not 0 (one tzcnt)."""
    if bits != types.uint64:
        return None
    return types.int64(bits), lambda context, builder, sig, args: builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))


@intrinsic
def _int64s_at(typingctx, address):  # pragma: no cover (compiled)
    """An int64 address as a pointer to int64s (numba.carray makes it an array): how
    band_gather_group writes into each input's band, which are separate tensors."""
    if address != types.int64:
        return None
    pointer = types.CPointer(types.int64)
    return pointer(address), lambda context, builder, sig, args: builder.inttoptr(
        args[0], context.get_value_type(pointer))


BAND_BLOCK = 64  # keys per _band_bits: one uint64 of flags
SAMPLE_BLOCK = 64  # contiguous elements per block of sample_histogram: whole vectors


@intrinsic
def _band_bits(typingctx, keys, at, span):  # pragma: no cover (compiled)
    """Bit i set where keys[at + i] <= span, for i < 64 (a C-contiguous uint32 or uint64 array,
    at + 64 within it): one vector compare whose lanes become the bits (vpcmpud and kmov with
    AVX-512). numba's own loop, `bits |= (keys[i] <= span) << i`, took 0.34 ns per key."""
    if not (isinstance(keys, types.Array) and keys.ndim == 1 and keys.layout == "C"
            and keys.dtype in (types.uint32, types.uint64) and span == keys.dtype and isinstance(at, types.Integer)):
        return None
    lane = ir.IntType(keys.dtype.bitwidth)
    vector = ir.VectorType(lane, BAND_BLOCK)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        first = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        block = builder.load(builder.bitcast(first, vector.as_pointer()), align=lane.width // 8)
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), args[2], ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined),
                                       ir.Constant(ir.VectorType(_I32, BAND_BLOCK), [0] * BAND_BLOCK))
        return builder.bitcast(builder.icmp_unsigned("<=", block, splat), ir.IntType(BAND_BLOCK))

    return types.uint64(keys, at, span), codegen


@intrinsic
def _wide_vectors(typingctx):  # pragma: no cover (compiled)
    """Let LLVM vectorise the calling kernel's loops at the CPU's widest vectors: 512 bits with
    AVX-512, where its x86 tuning prefers 256 (clang's -mprefer-vector-width=512, as the
    function attribute it sets; llvmlite lists no string attributes, so it is added as
    text). A kernel's first statement; a no-op where vectors are narrower."""
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


def _half_by_fpext() -> bool:
    """Whether LLVM widens a half with an instruction on this CPU (x86-64 with F16C, 64-bit
    Arm); elsewhere, or where numba compiles for another CPU than this one (NUMBA_CPU_NAME,
    e.g. a portable cache), its `fpext` becomes a call to a runtime function numba's JIT may
    lack."""
    if numba.config.CPU_NAME not in (None, "host"):
        return False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return bool(llvm_binding.get_host_cpu_features().get("f16c", False))
    return machine in ("aarch64", "arm64")


HALF_BY_FPEXT = _half_by_fpext()


def _half_to_float(by_fpext: bool):
    """The codegen of a float16's bits (uint16) to the float32 it is, exactly (torch's
    conversion, a NaN made quiet). LLVM's `fpext` is one vcvtph2ps per vector on x86 (F16C),
    with no microcode assist on subnormal halves: TIES's grouped output took 6.3 ns per
    element of a 7-input chunk with the integer rebias below, 4.6 with `fpext` (one thread). The
    rebias is for CPUs without such an instruction; a subnormal half goes through an
    integer-to-float conversion there, since a float multiply with a subnormal operand costs
    a microcode assist (4.1 ns per element against 0.2)."""
    if by_fpext:
        return lambda context, builder, sig, args: builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    def rebias(context, builder, sig, args):
        const = lambda c: ir.Constant(_I32, c)  # noqa: E731
        u = builder.zext(args[0], _I32)
        magnitude = builder.and_(u, const(0x7FFF))
        exponent = builder.and_(u, const(0x7C00))
        moved = builder.shl(magnitude, const(13))  # exponent and mantissa into float32's fields
        normal = builder.add(moved, const((127 - 15) << 23))  # rebiased
        tiny = builder.bitcast(builder.fmul(builder.sitofp(magnitude, _F32), ir.Constant(_F32, 2.0**-24)), _I32)
        quiet = builder.select(builder.icmp_unsigned("!=", builder.and_(u, const(0x3FF)), const(0)),
                               const(0x400000), const(0))  # torch makes a NaN quiet
        special = builder.or_(builder.or_(moved, const(0x7F800000)), quiet)  # inf or NaN
        bits = builder.select(builder.icmp_unsigned("==", exponent, const(0)), tiny,
                              builder.select(builder.icmp_unsigned("==", exponent, const(0x7C00)), special, normal))
        sign = builder.shl(builder.and_(u, const(0x8000)), const(16))
        return builder.bitcast(builder.or_(bits, sign), _F32)

    return rebias


@intrinsic
def _widen(typingctx, v):  # pragma: no cover (compiled)
    """A source element as a float: float16 bits (uint16) and bfloat16 bits (int16) become the
    float32 they are exactly (torch's conversion, a NaN made quiet); a float stays as it is."""
    if v == types.uint16:
        return types.float32(v), _half_to_float(HALF_BY_FPEXT)
    if v == types.int16:
        return types.float32(v), lambda context, builder, sig, args: builder.bitcast(
            builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), _F32)
    if isinstance(v, types.Float):
        return v(v), lambda context, builder, sig, args: args[0]
    return None


@intrinsic
def _widen_half_by_rebias(typingctx, v):  # pragma: no cover (compiled)
    """_widen's float16 path for CPUs without a half-to-float instruction, whatever this one
    has: for its test."""
    return (types.float32(v), _half_to_float(False)) if v == types.uint16 else None


def _key_constants(dtype: torch.dtype) -> tuple[type, np.integer, np.integer]:
    """stats.magnitude_bits' patterns for `dtype`, for the kernels: the numpy integer type the
    floats are viewed as, the mask that clears the sign, and the one key every NaN gets."""
    pattern = _PATTERNS[dtype]
    ints = {torch.int32: np.int32, torch.int64: np.int64}[pattern.int_dtype]
    return ints, ints((1 << pattern.bits) - 1), ints(pattern.inf + 1)


supported = kernel_takes  # which tensors these kernels take (tests switch the kernels off here)


def takes_source(x: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether the kernels take x, an input chunk as read, for a pass in like's dtype: x is
    contiguous on the CPU, of like's dtype or one that widens to it exactly (base.WIDENED)."""
    return (x.device.type == "cpu" and x.is_contiguous()
            and (x.dtype == like.dtype or (x.dtype, like.dtype) in WIDENED))


def flat(t) -> np.ndarray:
    """A contiguous torch tensor as the 1-D numpy view the kernels take."""
    return t.numpy() if t.dim() == 1 else t.view(-1).numpy()  # view(-1) alone costs 0.7 us a call


_np = flat


def source_array(x: torch.Tensor) -> np.ndarray:
    """An input chunk as the kernels read it (_widen): float16 as its uint16 bits, bfloat16 as
    its int16 bits (numpy has no bfloat16, numba no float16 on the CPU), a float as it is."""
    if x.dtype == torch.float16:
        return _np(x.view(torch.int16)).view(np.uint16)
    if x.dtype == torch.bfloat16:
        return _np(x.view(torch.int16))
    return _np(x)


def _bytes_store(what: str, store: torch.Tensor) -> None:
    """The grouped kernels' rows lie in a contiguous CPU uint8 buffer: refuse any other."""
    if store.dtype != torch.uint8 or store.device.type != "cpu" or not store.is_contiguous():
        raise ValueError(f"{what}: the store is {store.dtype} on {store.device}, not contiguous CPU bytes")


def _same_size(what: str, *tensors: torch.Tensor) -> None:
    """The kernels index without bounds checks: refuse mismatched buffers up front."""
    if len({t.numel() for t in tensors}) > 1:
        raise ValueError(f"{what}: sizes differ: {', '.join(str(t.numel()) for t in tensors)}")


@numba.njit(**KERNEL)
def _delta_tile(x, base, subtract, s, m, buf):  # pragma: no cover (compiled)
    """buf[:m] = x[s:s+m] - base[s:s+m] (torch.sub's bits), or x's values as they are (x: a
    source, see _widen)."""
    _wide_vectors()
    # Slices, not x[s + i]: an index that may be negative to numba kept the float16 loop from
    # vectorising (1.1 ns per element against 0.19).
    xs = x[s : s + m]
    if subtract:
        bs = base[s : s + m]
        for i in range(m):
            buf[i] = _widen(xs[i]) - bs[i]
    else:
        for i in range(m):
            buf[i] = _widen(xs[i])


@numba.njit(inline="always")
def _magnitude_key(d, sign_cleared, nan_key):  # pragma: no cover (compiled)
    """stats.magnitude_bits of one float: its pattern without the sign, every NaN one key
    above inf (the selections' order of magnitudes, as integers)."""
    return min(_float_bits(d) & sign_cleared, nan_key)


@numba.njit(inline="always")
def _kept_from(x, base, least, sign_cleared, nan_key, zero):  # pragma: no cover (compiled)
    """x - base where the top-k keeps it, else +0.0, as keep_only's AND: where its key
    (stats.magnitude_bits) is at least `least`, in the keys' own integer type (_least_keys:
    the bound of the elements on one side of the cut; int64 indices and bounds halved the
    vectors)."""
    d = _widen(x) - base
    return d if _magnitude_key(d, sign_cleared, nan_key) >= least else zero


@numba.njit(**KERNEL)
def _topk_delta(x, base, out, accumulate, start, cut, least_before, least_after, sign_cleared,
                nan_key):  # pragma: no cover (compiled)
    _wide_vectors()
    # One loop per side of the cut, no scratch tile: with the bit casts as intrinsics everything
    # stays in registers (the three loops over a tile before: 0.95 ns per element).
    zero = out.dtype.type(0)
    n = out.shape[0]
    before = min(max(cut - start, 0), n)  # elements before the cut
    for part in range(2):
        lo, hi = (0, before) if part == 0 else (before, n)
        least = least_before if part == 0 else least_after
        xs, bs, os = x[lo:hi], base[lo:hi], out[lo:hi]  # slices: see _delta_tile
        for i in range(hi - lo):
            d = _kept_from(xs[i], bs[i], least, sign_cleared, nan_key, zero)
            os[i] = os[i] + d if accumulate else d


def _least_keys(result, nan_key: np.integer) -> tuple[np.integer, np.integer]:
    """A stats.TopKResult as the least key kept, in the keys' integer type (nan_key's, see
    _key_constants): for the elements before its cut, and for those from the cut on
    (_kept_from): a key above the threshold is kept anywhere, one equal to it before the cut
    only."""
    ints = type(nan_key)
    if result.k == 0:
        return nan_key + ints(1), nan_key + ints(1)  # no key is that large
    if result.k == result.numel:
        return ints(0), ints(0)
    return ints(result.threshold_bits), ints(result.threshold_bits + 1)


def _cut(result) -> int:
    """The element index from which a key equal to the threshold is no longer kept."""
    return result.cut_index if 0 < result.k < result.numel and result.n_equal_to_keep else 0


def topk_delta(out: torch.Tensor, x: torch.Tensor, base: torch.Tensor, start: int, result, *,
               accumulate: bool) -> None:
    """out = d, or out += d, for elements [start, start + n): d = x - base where `result` (a
    stats.TopKResult over the deltas) keeps the element, else +0.0. Bit for bit torch.sub,
    TopKResult.mask, keep_only and add_."""
    _same_size("topk_delta", out, x, base)
    _, sign_cleared, nan_key = _key_constants(out.dtype)
    _topk_delta(source_array(x), _np(base), _np(out), accumulate, start, _cut(result), *_least_keys(result, nan_key),
                sign_cleared, nan_key)


@numba.njit(inline="always")
def _side_terms(v, w, count, zero, one):  # pragma: no cover (compiled)
    """What taskvec._Sides.add adds for a delta v: (the score's term, v's positive and negative
    parts, the weights of each side). Scalars only: an inlined function taking arrays costs a
    reference count per call (20 ns per element, measured)."""
    sign = one if v > zero else (-one if v < zero else zero)  # torch.sign: NaN -> 0
    term = sign if count else v
    if v != v:
        v = zero  # a NaN delta is on neither side
    pos = v if v > zero else zero
    low = v if v < zero else zero
    return term, pos, low, w * (sign if sign > zero else zero), -w * (sign if sign < zero else zero)


@numba.njit(**KERNEL)
def _sides_add(d, score, mix, neg, count, pos_w, neg_w, weighted, w, first):  # pragma: no cover (compiled)
    _wide_vectors()
    zero = mix.dtype.type(0)
    one = mix.dtype.type(1)
    # Two loops: without weights, pos_w and neg_w are mix (sides_add), and a loop that names
    # them would not vectorise (4.9 ns per element against 0.6, measured).
    if weighted:
        for i in range(d.shape[0]):
            term, pos, low, wp, wn = _side_terms(d[i], w, count, zero, one)
            score[i] = term if first else score[i] + term
            mix[i] = pos if first else mix[i] + pos
            neg[i] = low if first else neg[i] + low
            neg_w[i] = wn if first else neg_w[i] + wn
            pos_w[i] = wp if first else pos_w[i] + wp
    else:
        for i in range(d.shape[0]):
            term, pos, low, _, _ = _side_terms(d[i], w, count, zero, one)
            score[i] = term if first else score[i] + term
            mix[i] = pos if first else mix[i] + pos
            neg[i] = low if first else neg[i] + low


def _weight_sums(weights: tuple[torch.Tensor, torch.Tensor] | None, mix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The positive and negative weight sums, or mix twice (not read) without normalize."""
    return weights if weights is not None else (mix, mix)


def sides_add(d: torch.Tensor, score: torch.Tensor, mix: torch.Tensor, neg: torch.Tensor, count: bool,
              weights: tuple[torch.Tensor, torch.Tensor] | None, w: float, *, first: bool = False) -> None:
    """taskvec._Sides.add's sums in one pass: the election score, the positive and negative
    sums and, with `weights` (positive, negative), the weights of each side; with `first`,
    the sums are written, not added to (as adding to +0, but for the sign of a zero score or
    weight sum, which changes no output). d is left as it is."""
    pos_w, neg_w = _weight_sums(weights, mix)
    _same_size("sides_add", d, score, mix, neg, pos_w, neg_w)
    scalar = _np(d).dtype.type
    _sides_add(_np(d), _np(score), _np(mix), _np(neg), count, _np(pos_w), _np(neg_w), weights is not None, scalar(w),
               first)


@numba.njit(inline="always")
def _elected(score, pos, low, pos_w, neg_w, weighted, lambda_, base, zero, one):  # pragma: no cover (compiled)
    """taskvec._Sides.finish for one element. The caller loads both sides before the pick: a
    pick between two loads compiled to a branch, which mispredicts on random signs (4.2 ns per
    element against 0.83, measured)."""
    elected = score >= zero  # a tie elects +, a NaN score -
    m = pos if elected else low
    if weighted:
        divisor = pos_w if elected else neg_w
        m = m / (divisor + (one if divisor == zero else zero))  # a zero divisor reads as 1
    return m * lambda_ + base  # two roundings: numba contracts no multiply-add by default


@numba.njit(**KERNEL)
def _sides_finish(score, mix, neg, pos_w, neg_w, weighted, lambda_, base):  # pragma: no cover (compiled)
    _wide_vectors()
    zero = mix.dtype.type(0)
    one = mix.dtype.type(1)
    if weighted:
        for i in range(mix.shape[0]):
            pos, low, pw, nw = mix[i], neg[i], pos_w[i], neg_w[i]
            mix[i] = _elected(score[i], pos, low, pw, nw, True, lambda_, base[i], zero, one)
    else:  # pos_w and neg_w are mix: not named (see _sides_add)
        for i in range(mix.shape[0]):
            pos, low = mix[i], neg[i]
            mix[i] = _elected(score[i], pos, low, zero, zero, False, lambda_, base[i], zero, one)


@numba.njit(**KERNEL)
def _topk_sides_group(xs, rows, stride, base, start, cuts, least_before, least_after, sign_cleared, nan_key, scaled,
                      ws, score, mix, neg, count, pos_w, neg_w, weighted, first, last, lambda_, t_base, t_score, t_mix,
                      t_neg, t_pw, t_nw):  # pragma: no cover (compiled)
    _wide_vectors()
    # Tile by tile, every input of the group in turn, the sums in L1-sized tiles: the chunk-sized
    # sums are read and written once per group, not once per input (with all inputs in one
    # group, never: the last group writes the output). The tiles are separate arrays: tiles
    # that were rows of one array did not vectorise (1.0 to 15 ns per element, measured).
    # A tile ends where a row's cut falls inside it (TopKResult.mask: a key equal to the
    # threshold is kept before the cut only), so that in every tile each row keeps the keys of
    # at least one bound, in the keys' own integer type (_kept_from; int64 indices and bounds
    # halved the vectors). Per row one loop from the input to the sums, the weights' sums taken
    # with or without `weighted`: a test of it, or of whether the sums start here, inside the
    # loop stayed there as masked loads and stores of every sum (micro_benchmarks: 0.59 ns per
    # input element, against 0.44 now).
    zero = mix.dtype.type(0)
    one = mix.dtype.type(1)
    n = mix.shape[0]
    s = 0
    while s < n:
        m = min(t_score.shape[0], n - s)
        for g in range(rows):
            if s < cuts[g] - start < s + m:
                m = cuts[g] - start - s
        bs, read_base = t_base[:m], base[s : s + m]  # the base as read, widened once per tile
        for i in range(m):
            bs[i] = _widen(read_base[i])
        if first:  # the sums start at +0, as the torch path's
            t_score[:m] = zero
            t_mix[:m] = zero
            t_neg[:m] = zero
        else:
            t_score[:m] = score[s : s + m]
            t_mix[:m] = mix[s : s + m]
            t_neg[:m] = neg[s : s + m]
        if weighted and not first:
            t_pw[:m] = pos_w[s : s + m]
            t_nw[:m] = neg_w[s : s + m]
        else:  # without weights, summed all the same (one loop) and never read
            t_pw[:m] = zero
            t_nw[:m] = zero
        for g in range(rows):
            xg = xs[g * stride + s : g * stride + s + m]  # row g: `stride` elements apart
            w, scale = ws[g], scaled[g]
            least = least_before[g] if start + s < cuts[g] else least_after[g]
            for i in range(m):
                d = _kept_from(xg[i], bs[i], least, sign_cleared, nan_key, zero)
                term, pos, low, wp, wn = _side_terms(d * w if scale else d, w, count, zero, one)
                t_score[i] += term
                t_mix[i] += pos
                t_neg[i] += low
                t_pw[i] += wp
                t_nw[i] += wn
        if last:
            out = mix[s : s + m]
            for i in range(m):
                out[i] = _elected(t_score[i], t_mix[i], t_neg[i], t_pw[i], t_nw[i], weighted, lambda_, bs[i], zero,
                                  one)
        else:
            score[s : s + m] = t_score[:m]
            mix[s : s + m] = t_mix[:m]
            neg[s : s + m] = t_neg[:m]
            if weighted:
                pos_w[s : s + m] = t_pw[:m]
                neg_w[s : s + m] = t_nw[:m]
        s += m


GROUP_TILE = 1024  # elements per tile of topk_sides_group: its six tiles (24 KiB in float32) stay in L1


def topk_sides_group(store: torch.Tensor, rows: int, dtype: torch.dtype, slot: int, base: torch.Tensor, start: int,
                     results: list, weights: list[float], score: torch.Tensor, mix: torch.Tensor, neg: torch.Tensor,
                     count: bool, pos_neg_weights: tuple[torch.Tensor, torch.Tensor] | None, *, first: bool,
                     lambda_: float | None) -> None:
    """For each of `rows` inputs' chunks as read (`dtype`, one per `slot` bytes of the uint8
    `store`, in input order; results and weights one per row): topk_delta, times w (unless w
    is 1), then sides_add, in one pass over the chunk: the same sums, bit for bit. The base
    as read, or in the sums' dtype.
    With `lambda_`, this group is the last, and sides_finish follows in the same pass (mix
    becomes the output; score, neg and the weight sums are not written)."""
    n = mix.numel()
    size = torch.empty(0, dtype=dtype).element_size()
    _bytes_store("topk_sides_group", store)
    if not 0 < rows == len(results) == len(weights) or slot % size or slot < n * size or store.numel() < rows * slot:
        raise ValueError(f"topk_sides_group: {rows} rows of {slot} bytes in {store.numel()} for {n} elements, "
                         f"{len(results)} results, {len(weights)} weights")
    xs = store[: rows * slot].view(dtype)
    pos_w, neg_w = _weight_sums(pos_neg_weights, mix)
    _same_size("topk_sides_group", base, score, mix, neg, pos_w, neg_w)
    if not (takes_source(xs, mix) and takes_source(base, mix)):
        raise ValueError(f"topk_sides_group: {dtype} rows and a {base.dtype} base for a {mix.dtype} pass")
    ints, sign_cleared, nan_key = _key_constants(mix.dtype)
    least = [_least_keys(r, nan_key) for r in results]
    scalar = _np(mix).dtype.type
    _topk_sides_group(
        source_array(xs), rows, slot // size, source_array(base), start,
        np.array([_cut(r) for r in results], dtype=np.int64),
        np.array([b for b, _ in least], dtype=ints), np.array([a for _, a in least], dtype=ints), sign_cleared, nan_key,
        np.array([w != 1.0 for w in weights]), np.array(weights, dtype=_np(mix).dtype), _np(score), _np(mix), _np(neg),
        count, _np(pos_w), _np(neg_w), pos_neg_weights is not None, first, lambda_ is not None,
        scalar(1.0 if lambda_ is None else lambda_),
        *(np.empty(min(GROUP_TILE, max(1, mix.numel())), dtype=_np(mix).dtype) for _ in range(6)))


def sides_finish(score: torch.Tensor, mix: torch.Tensor, neg: torch.Tensor,
                 weights: tuple[torch.Tensor, torch.Tensor] | None, lambda_: float, base: torch.Tensor) -> None:
    """taskvec._Sides.finish in one pass: mix = the elected side (divided by its weights, a
    zero read as 1), times lambda_ (in mix's dtype, as torch's mul_ by a Python number), plus
    base."""
    pos_w, neg_w = _weight_sums(weights, mix)
    _same_size("sides_finish", score, mix, neg, pos_w, neg_w, base)
    scalar = _np(mix).dtype.type
    _sides_finish(_np(score), _np(mix), _np(neg), _np(pos_w), _np(neg_w), weights is not None, scalar(lambda_),
                  _np(base))


@numba.njit(**KERNEL)
def _digit_histogram(x, base, subtract, sign_cleared, nan_key, filtered, prefix_shift, prefix, digit_shift, digit_mask,
                     hist, keys_out, store, buf, buf_bits):  # pragma: no cover (compiled)
    _wide_vectors()
    count = 0
    kmin = nan_key
    kmax = -1
    n = x.shape[0]
    for s in range(0, n, buf.shape[0]):
        m = min(s + buf.shape[0], n) - s
        _delta_tile(x, base, subtract, s, m, buf)
        # _magnitude_key of the tile's bits: with buf[i] (a float) the first loop took 1.4 ns, not 1.0
        if not filtered:  # every key counts: the keys and extremes vectorised, then the scatter
            for i in range(m):
                key = min(buf_bits[i] & sign_cleared, nan_key)
                kmin = min(kmin, key)
                kmax = max(kmax, key)
                buf_bits[i] = key
            _scatter(buf_bits, m, 0, digit_shift, digit_mask, hist)
            if store:
                keys_out[count : count + m] = buf_bits[:m]
            count += m
            continue
        for i in range(m):
            key = min(buf_bits[i] & sign_cleared, nan_key)
            if (key >> prefix_shift) != prefix:
                continue
            hist[(key >> digit_shift) & digit_mask] += 1
            if store:
                keys_out[count] = key
            count += 1
            kmin = min(kmin, key)
            kmax = max(kmax, key)
    return count, kmin, kmax


@numba.njit(**KERNEL)
def _scatter(keys, m, offset, digit_shift, digit_mask, hist):  # pragma: no cover (compiled)
    """hist[digit of keys[i] + offset] += 1 for i < m. Apart from the loops that compute the
    keys: a scatter in a loop keeps the whole loop from vectorising (a pass of the band with
    the histogram took 1.9 ns per element in one loop)."""
    for i in range(m):
        hist[((keys[i] + offset) >> digit_shift) & digit_mask] += 1


@numba.njit(inline="always")
def _delta_key(x, base, subtract, sign_cleared, nan_key):  # pragma: no cover (compiled)
    """The magnitude key (stats.magnitude_bits) of x - base (torch.sub's bits), or of x."""
    return _magnitude_key(_widen(x) - base if subtract else _widen(x), sign_cleared, nan_key)


@numba.njit(**KERNEL)
def _band_keys(x, base, subtract, s, m, sign_cleared, nan_key, lo_key, hi_key, out, extremes, kmin,
               kmax):  # pragma: no cover (compiled)
    """out[:m] = the keys of x[s:s+m] - base[s:s+m] (or of x), less lo_key; returns how many
    lie above hi_key and, with `extremes`, the smallest and largest key so far. One loop from
    the input to the keys, no float tile between (0.54 ns per element against 0.66)."""
    _wide_vectors()
    above = 0
    xs, bs = x[s : s + m], base[s : s + m]
    if extremes:
        for i in range(m):
            key = _delta_key(xs[i], bs[i], subtract, sign_cleared, nan_key)
            kmin = min(kmin, key)
            kmax = max(kmax, key)
            above += key > hi_key
            out[i] = key - lo_key
    else:
        for i in range(m):
            key = _delta_key(xs[i], bs[i], subtract, sign_cleared, nan_key)
            above += key > hi_key
            out[i] = key - lo_key
    return above, kmin, kmax


@numba.njit(**KERNEL)
def _band_gather(x, base, subtract, sign_cleared, nan_key, lo_key, hi_key, span, keys_out, index_out, start,
                 buf_bits, buf_unsigned):  # pragma: no cover (compiled)
    _wide_vectors()
    # Per tile: the keys (less lo_key) and the count above the band, branch-free (vectorised,
    # _band_keys), then the few keys in the band, found by an unsigned compare of key - lo_key
    # with the band's span: a 64-bit mask per 64 keys (one vector compare, _band_bits), then a
    # walk over its set bits. A branch on "above" would mispredict for about a fifth of the
    # keys, and a branch per key on "inside" for the 1.5-3% inside, at random places (measured:
    # 1.9 ns per element with both in one loop, 0.85-1.0 with a branch per key inside,
    # 0.55-0.62 with the mask built by a numba loop, 0.43-0.50 now).
    banded = 0
    above = 0
    n = x.shape[0]
    for s in range(0, n, buf_bits.shape[0]):
        m = min(s + buf_bits.shape[0], n) - s
        tile_above, _, _ = _band_keys(x, base, subtract, s, m, sign_cleared, nan_key, lo_key, hi_key, buf_bits,
                                      False, nan_key, nan_key)
        above += tile_above
        banded = _band_tile(buf_bits, buf_unsigned, m, span, lo_key, keys_out, index_out, banded, start + s)
    return banded, above


@numba.njit(**KERNEL)
def _band_tile(buf_bits, buf_unsigned, m, span, lo_key, keys_out, index_out, banded, first):  # pragma: no cover
    """A tile's keys in the band (buf_bits[:m], less lo_key, from _band_keys), with their element
    indices from `first`, into keys_out and index_out from slot `banded`; returns `banded` plus
    how many there were (past the slots, only counted: the caller drops the band)."""
    # The tile is whole blocks (band_gather): keys past the last are set above the band.
    buf_unsigned[m : -(-m // BAND_BLOCK) * BAND_BLOCK] = np.iinfo(buf_unsigned.dtype).max
    for b in range(0, m, BAND_BLOCK):
        bits = _band_bits(buf_unsigned, b, span)
        while bits:
            i = b + _lowest_set(bits)
            bits &= bits - np.uint64(1)
            if banded < keys_out.shape[0]:
                keys_out[banded] = buf_bits[i] + lo_key
                index_out[banded] = first + i
            banded += 1
    return banded


@numba.njit(**KERNEL)
def _band_gather_group(xs, slots, stride, base, sign_cleared, nan_key, lo_keys, hi_keys, spans, key_at, index_at,
                       rooms, start, banded, above, t_base, buf_bits, buf_unsigned):  # pragma: no cover (compiled)
    _wide_vectors()
    # Tile by tile, the base widened once into an L1 tile, then every row's keys against it
    # (_band_keys, _band_tile): the base is read once per chunk, not once per input.
    n = base.shape[0]
    for s in range(0, n, buf_bits.shape[0]):
        m = min(s + buf_bits.shape[0], n) - s
        bs = base[s : s + m]
        for i in range(m):
            t_base[i] = _widen(bs[i])
        for g in range(slots.shape[0]):
            at = slots[g] * stride + s
            tile_above, _, _ = _band_keys(xs[at : at + m], t_base, True, 0, m, sign_cleared,
                                          nan_key, lo_keys[g], hi_keys[g], buf_bits, False, nan_key, nan_key)
            above[g] += tile_above
            banded[g] = _band_tile(buf_bits, buf_unsigned, m, spans[g], lo_keys[g],
                                   numba.carray(_int64s_at(key_at[g]), rooms[g]),
                                   numba.carray(_int64s_at(index_at[g]), rooms[g]), banded[g], start + s)


@numba.njit(**KERNEL)
def _sample_histogram(x, base, subtract, sign_cleared, nan_key, zero, every, digit_shift, hist,
                      buf_bits):  # pragma: no cover (compiled)
    """The first digits of the keys of x[s : s + block] (block: buf_bits' length) for s = 0,
    every, 2 * every...: counted into hist. Returns how many keys it counted, and the largest."""
    _wide_vectors()
    sampled = 0
    kmax = zero - 1
    n = x.shape[0]
    for s in range(0, n, every):
        m = min(s + buf_bits.shape[0], n) - s
        _, _, kmax = _band_keys(x, base, subtract, s, m, sign_cleared, nan_key, zero, nan_key, buf_bits, True,
                                nan_key, kmax)
        _scatter(buf_bits, m, zero, digit_shift, -1, hist)
        sampled += m
    return sampled, kmax


@numba.njit(**KERNEL)
def _band_digits(hist, top_rank, bottom_rank, first):  # pragma: no cover (compiled)
    above = 0
    before = 0  # keys above the top digit
    top = -1
    for d in range(first, -1, -1):
        if top < 0 and above + hist[d] >= top_rank:
            top, before = d, above
        above += hist[d]
        if top >= 0 and above >= bottom_rank:
            return d, top, above - before
    return 0, max(top, 0), above - before  # fewer keys than bottom_rank: down to digit 0


def band_digits(hist: torch.Tensor, top_rank: int, bottom_rank: int, first: int) -> tuple[int, int, int]:
    """The digits holding the top_rank-th and the bottom_rank-th largest keys counted in `hist`
    (top_rank <= bottom_rank), and how many keys lie in the digits from one to the other: a
    scan from digit `first` down (no key lies above it), where the cumulative sum of the whole
    histogram took 55 us."""
    lo, hi, inside = _band_digits(_np(hist), top_rank, bottom_rank, min(first, hist.numel() - 1))
    return int(lo), int(hi), int(inside)


def _operands(x: torch.Tensor, base: torch.Tensor | None, what: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """x (as read, with base: _source), and base (or x again, unread) for the kernels' optional
    subtraction."""
    if base is None:
        return _np(x), _np(x), False
    _same_size(what, x, base)
    return source_array(x), _np(base), True


def _tile(x: torch.Tensor, dtype: type | None = None, block: int = 1) -> np.ndarray:
    """Scratch for one tile of x's elements, in x's dtype or `dtype`, rounded up to whole blocks."""
    return np.empty(-(-min(TILE, max(1, x.numel())) // block) * block, dtype=dtype or _np(x).dtype)


def digit_histogram(x: torch.Tensor, known: int, prefix: int, width: int, digit_bits: int, hist: torch.Tensor,
                    keys_out: torch.Tensor | None, *, clamp_nan: bool = True, base: torch.Tensor | None = None,
                    ) -> tuple[int, int, int]:
    """Selection.feed's magnitude pass in one pass over x (float32 or float64, CPU), or over
    x - base with `base` (torch.sub's bits; only with `clamp_nan`, which makes a NaN's payload
    irrelevant): the keys (stats.magnitude_bits) whose top `known` bits are `prefix` add their
    next `digit_bits` bits' digit to `hist`; with `keys_out`, they are also written there in
    element order. Returns (how many keys share the prefix, their smallest, their largest; -1
    for none). Without `clamp_nan`, a NaN's key is its pattern as it is
    (della.magnitude_bins), not one pattern above inf."""
    delta = x if base is None else base  # with base, x may be a source (_source) of a narrower dtype
    ints, sign_cleared, nan_key = _key_constants(delta.dtype)
    if hist.numel() != 1 << digit_bits or (keys_out is not None and keys_out.numel() < x.numel()):
        raise ValueError(f"digit_histogram: {hist.numel()} bins for {digit_bits} bits, or too few key slots")
    if base is not None and not clamp_nan:
        raise ValueError("digit_histogram: a subtraction's NaN payload is torch's only where NaN keys are clamped")
    out = _np(keys_out) if keys_out is not None else np.empty(0, dtype=ints)
    buf = _tile(delta)
    count, kmin, kmax = _digit_histogram(
        *_operands(x, base, "digit_histogram"), sign_cleared, nan_key if clamp_nan else sign_cleared,
        known > 0, width - known, prefix, width - known - digit_bits, (1 << digit_bits) - 1, _np(hist), out,
        keys_out is not None, buf, buf.view(ints))
    return int(count), int(kmin), int(kmax)


def band_gather(x: torch.Tensor, base: torch.Tensor | None, digit_shift: int, lo: int, hi: int,
                keys_out: torch.Tensor, index_out: torch.Tensor, start: int) -> tuple[int, int]:
    """Selection's first pass with a band, in one pass over x (or x - base, as digit_histogram):
    the keys whose digit (key >> digit_shift, the first digit) is in [lo, hi], and their element
    indices from `start`, go to keys_out and index_out (int64, as many slots as there is room)
    in element order. Returns (how many keys are in the band, more than the slots if they
    overflowed; how many lay above it)."""
    delta = x if base is None else base
    ints, sign_cleared, nan_key = _key_constants(delta.dtype)
    if keys_out.numel() != index_out.numel() or {keys_out.dtype, index_out.dtype} != {torch.int64}:
        raise ValueError("band_gather: slots for keys and indices differ, or are not int64")
    unsigned = {np.int32: np.uint32, np.int64: np.uint64}[ints]
    lo_key, hi_key = lo << digit_shift, ((hi + 1) << digit_shift) - 1
    # A tile of keys less lo_key, also read as unsigned for the band's compare, in whole blocks
    # of _band_bits (span < the unsigned maximum, the padding's key: no padding is in the band).
    keys = _tile(x, ints, BAND_BLOCK)
    # Bounds in the keys' own integer types: int64 operands would halve the vector width.
    banded, above = _band_gather(
        *_operands(x, base, "band_gather"), sign_cleared, nan_key, ints(lo_key), ints(hi_key),
        unsigned(hi_key - lo_key), _np(keys_out), _np(index_out), start, keys, keys.view(unsigned))
    return int(banded), int(above)


def band_gather_group(store: torch.Tensor, slots: list[int], dtype: torch.dtype, slot: int, base: torch.Tensor,
                      delta_dtype: torch.dtype, start: int, bands: list[tuple[int, int, int]],
                      keys_outs: list[torch.Tensor], index_outs: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """band_gather for several inputs at once, each against the same base: their chunks as read
    (`dtype`, in the uint8 `store`, row g's at slots[g] * `slot` bytes), the base as read (its
    own dtype), the deltas in `delta_dtype` (x and base widen to it exactly). Row g's band is
    bands[g] = (digit_shift, lo, hi) and its keys and indices go to keys_outs[g] and
    index_outs[g] (int64, as many slots as there is room). Returns per row (how many keys are
    in the band, more than the slots if they overflowed; how many lay above it)."""
    n, rows = base.numel(), len(slots)
    size = torch.empty(0, dtype=dtype).element_size()
    _bytes_store("band_gather_group", store)
    if not 0 < rows == len(bands) == len(keys_outs) == len(index_outs) or slot % size or slot < n * size \
            or min(slots) < 0 or store.numel() < (max(slots) + 1) * slot or base.device.type != "cpu" \
            or not base.is_contiguous():
        raise ValueError(f"band_gather_group: slots {slots} of {slot} bytes in {store.numel()} for {n} elements, "
                         f"{len(bands)} bands, {len(keys_outs)} and {len(index_outs)} outputs")
    for t in (dtype, base.dtype):
        if t != delta_dtype and (t, delta_dtype) not in WIDENED:
            raise ValueError(f"band_gather_group: {t} does not widen to {delta_dtype} exactly")
    outs = [*keys_outs, *index_outs]
    # The kernel writes through these addresses: each must be a contiguous CPU int64 tensor,
    # and its room the slots it has (checked here: the kernel has no bounds checks).
    if any(t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() for t in outs) or any(
            k.numel() != i.numel() for k, i in zip(keys_outs, index_outs, strict=True)):
        raise ValueError("band_gather_group: slots for keys and indices differ, or are not contiguous int64")
    ints, sign_cleared, nan_key = _key_constants(delta_dtype)
    unsigned = {np.int32: np.uint32, np.int64: np.uint64}[ints]
    lo_keys = np.array([lo << shift for shift, lo, _ in bands], dtype=ints)
    hi_keys = np.array([((hi + 1) << shift) - 1 for shift, _, hi in bands], dtype=ints)
    banded, above = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
    keys = _tile(base, ints, BAND_BLOCK)
    _band_gather_group(
        source_array(store[: (max(slots) + 1) * slot].view(dtype)), np.array(slots, dtype=np.int64), slot // size,
        source_array(base), sign_cleared, nan_key, lo_keys, hi_keys, (hi_keys - lo_keys).astype(unsigned),
        np.array([t.data_ptr() for t in keys_outs], dtype=np.int64),
        np.array([t.data_ptr() for t in index_outs], dtype=np.int64),
        np.array([t.numel() for t in keys_outs], dtype=np.int64), start, banded, above,
        np.empty(keys.size, dtype=_np(torch.empty(0, dtype=delta_dtype)).dtype), keys, keys.view(unsigned))
    return banded, above


@numba.njit(**KERNEL)
def _exact_topk_rows(xs, rows, stride, base, t_base, k, sign_cleared, nan_key, inert_zeros, keys,
                     out):  # pragma: no cover (compiled)
    n = base.shape[0]
    for i in range(n):
        t_base[i] = _widen(base[i])
    for r in range(rows):
        x = xs[r * stride : r * stride + n]
        for i in range(n):
            keys[i] = _delta_key(x[i], t_base[i], True, sign_cleared, nan_key)
        chosen = np.partition(keys, n - k)[n - k]  # the k-th largest key: the (n - k)-th smallest from 0
        greater = 0
        equal = 0
        for i in range(n):
            greater += keys[i] > chosen
            equal += keys[i] == chosen
        need = k - greater
        cut = n
        if chosen == 0 and inert_zeros:
            need = equal  # every zero kept: it changes no output value
        elif need < equal:  # the first `need` ties in index order are kept
            seen = 0
            for i in range(n):
                if keys[i] == chosen:
                    seen += 1
                    if seen == need:
                        cut = i + 1
                        break
        out[r, 0] = chosen
        out[r, 1] = greater
        out[r, 2] = equal
        out[r, 3] = need
        out[r, 4] = cut


def exact_topk_rows(store: torch.Tensor, rows: int, dtype: torch.dtype, slot: int, base: torch.Tensor,
                    delta_dtype: torch.dtype, k: int, inert_zeros: bool) -> np.ndarray:
    """The exact top-k selection (_select.Selection's result, bit for bit) of the deltas of `rows`
    inputs' chunks as read (`dtype`, in the uint8 `store`, `slot` bytes apart) against the base
    as read, in `delta_dtype`, where each chunk is a whole tensor of base.numel() elements and
    0 < k < numel: per row (threshold key, keys above it, keys equal to it, how many of those
    are kept, the cut index), as Selection._end_collect settles them. For small tensors: a
    partition of each row's keys, O(numel), in one call, where a Selection's passes cost
    ~1 ms of Python per tensor."""
    n = base.numel()
    size = dtype.itemsize
    _bytes_store("exact_topk_rows", store)
    if not 0 < k < n or slot % size or slot < n * size or store.numel() < rows * slot or not base.is_contiguous():
        raise ValueError(f"exact_topk_rows: {rows} rows of {slot} bytes in {store.numel()}, k={k} of {n}")
    for t in (dtype, base.dtype):
        if t != delta_dtype and (t, delta_dtype) not in WIDENED:
            raise ValueError(f"exact_topk_rows: {t} does not widen to {delta_dtype} exactly")
    ints, sign_cleared, nan_key = _key_constants(delta_dtype)
    out = np.empty((rows, 5), dtype=np.int64)
    _exact_topk_rows(source_array(store[: rows * slot].view(dtype)), rows, slot // size, source_array(base),
                     np.empty(n, dtype=_np(torch.empty(0, dtype=delta_dtype)).dtype), k, sign_cleared, nan_key,
                     inert_zeros, np.empty(n, dtype=ints), out)
    return out


def sample_histogram(x: torch.Tensor, base: torch.Tensor | None, digit_shift: int, hist: torch.Tensor,
                     every: int) -> tuple[int, int]:
    """The first digits (key >> digit_shift, as band_gather's) of a sample of x's keys (or of
    x - base's), counted into `hist`: blocks of SAMPLE_BLOCK elements, one every `every`
    elements (a multiple of SAMPLE_BLOCK; SAMPLE_BLOCK: all of them). Returns (how many keys
    were counted, the largest of them, -1 for none)."""
    delta = x if base is None else base
    ints, sign_cleared, nan_key = _key_constants(delta.dtype)
    if every < SAMPLE_BLOCK or every % SAMPLE_BLOCK:
        raise ValueError(f"sample_histogram: every={every} is not a multiple of {SAMPLE_BLOCK}")
    if hist.numel() << digit_shift != 1 << _PATTERNS[delta.dtype].bits:
        raise ValueError(f"sample_histogram: {hist.numel()} bins are not the first digit of {digit_shift} bits shifted")
    sampled, kmax = _sample_histogram(*_operands(x, base, "sample_histogram"), sign_cleared, nan_key, ints(0), every,
                                      ints(digit_shift), _np(hist), np.empty(SAMPLE_BLOCK, dtype=ints))
    return int(sampled), int(kmax)


def della_delta(out: torch.Tensor, x: torch.Tensor, base: torch.Tensor, stream: np.ndarray, start: int,
                probs: np.ndarray, *, rescale: bool, accumulate: bool) -> None:
    """DELLA's delta in one pass: d = x - base, kept where u < p (u from `stream`, rng.py; p =
    probs[della.magnitude_bins(d)], float64, one per bin: 2**b bins are the top b bits of the
    float32 magnitude pattern), divided by p in d's dtype with `rescale`, else
    +0.0; out = it, or out += it. Bit for bit della.sparsify's torch path, NaN payloads aside:
    where x and base are both NaN, the payload of their difference, so its bin and whether it
    is kept, may differ (the output there is NaN on both paths: the final add of the base)."""
    _same_size("della_delta", out, x, base)
    bin_bits = probs.shape[0].bit_length() - 1 if probs.ndim == 1 else -1
    if not 0 < bin_bits <= 31 or probs.shape[0] != 1 << bin_bits or probs.dtype != np.float64:
        raise ValueError(f"della_delta: expected 2**b float64 probabilities, got {probs.shape} {probs.dtype}")
    buf = _tile(out)
    tile, dtype = buf.size, buf.dtype
    narrow = np.empty(tile, dtype=np.float32)
    divisors = probs.astype(dtype)  # p in d's dtype, as torch's div_(prob.to(delta.dtype))
    scratch = (buf, narrow, narrow.view(np.int32), np.empty(tile, dtype=dtype),
               np.empty(tile, dtype=np.bool_), np.empty(tile + 2 * WORDS_PER_BLOCK, dtype=np.uint32))
    _della_delta(source_array(x), _np(base), _np(out), accumulate, stream, start, keep_thresholds(probs), divisors,
                 31 - bin_bits, rescale, *scratch)


# ----------------------------------------------------------------------------- Philox-4x32-10
# rng.py's generator (its module docstring says why this one) and the random methods' fused
# deltas: DARE's (rng.drop_delta_) and DELLA's (della_delta above).

# Philox-4x32 multipliers and Weyl key increments (Random123); numba freezes globals as constants.
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LOW32, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)


@numba.njit(**KERNEL)
def fill(stream, first_block, blocks, out):  # pragma: no cover (compiled)
    """out[4q : 4q + 4] = block first_block + q of `stream` (uint32 k0, k1, c2, c3): Philox-4x32-10
    with key (k0, k1) and counter (block mod 2**32, block // 2**32, c2, c3)."""
    _wide_vectors()
    k0, k1, c2, c3 = stream[0], stream[1], stream[2], stream[3]
    lo = np.uint64(first_block) & _LOW32
    hi = np.uint64(first_block) >> _S32
    for q in range(blocks):
        b = lo + np.uint64(q)  # the low counter word's carry goes into the next word
        x0, x1, x2, x3 = np.uint32(b & _LOW32), np.uint32(hi + (b >> _S32)), c2, c3
        a, bk = k0, k1
        for _ in range(10):
            p0, p1 = _M0 * np.uint64(x0), _M1 * np.uint64(x2)
            # The XORs are left to numba's integer promotion (their values stay below 2**32):
            # casting them back to uint32 here halves the speed (the loop no longer vectorises).
            x0, x1, x2, x3 = (np.uint32(p1 >> _S32) ^ x1 ^ a, np.uint32(p1),
                              np.uint32(p0 >> _S32) ^ x3 ^ bk, np.uint32(p0))
            a, bk = np.uint32(a + _W0), np.uint32(bk + _W1)
        out[4 * q], out[4 * q + 1], out[4 * q + 2], out[4 * q + 3] = x0, x1, x2, x3


@numba.njit(**KERNEL)
def tile_words(stream, start, count, words):  # pragma: no cover (compiled)
    """The words of elements [start, start + count) of `stream`, as a view into `words` (which
    holds count + 2 * WORDS_PER_BLOCK at least): the blocks that cover them, from the first."""
    _wide_vectors()
    first = start // WORDS_PER_BLOCK
    last = (start + count - 1) // WORDS_PER_BLOCK
    fill(stream, first, last - first + 1, words)
    return words[start - WORDS_PER_BLOCK * first :]


@numba.njit(**KERNEL)
def drop_delta(x, base, out, accumulate, stream, start, threshold, divisor, divide):  # pragma: no cover (compiled)
    """Tile by tile, for element start + i: d = x[i] - base[i] (x as read: _widen) where its
    word is below `threshold`, else +0.0 (NaN and inf too), then / divisor when `divide`;
    out[i] = d, or out[i] += d with `accumulate`. The arithmetic is IEEE in out's dtype, as
    torch's sub, div and add."""
    _wide_vectors()
    n = out.shape[0]
    words = np.empty(TILE + 2 * WORDS_PER_BLOCK, np.uint32)
    zero = out.dtype.type(0)
    for s in range(0, n, TILE):
        e = min(s + TILE, n)
        # Slices, so that every index below is known non-negative and the loops vectorise;
        # the flags are tested outside the loops for the same reason.
        w = tile_words(stream, start + s, e - s, words)
        xs, bs, os = x[s:e], base[s:e], out[s:e]
        # Drop, then divide, as torch (keep_only, then div_): a dropped 0 / divisor is +0, or
        # NaN for a divisor that is 0 in out's dtype.
        if accumulate and divide:
            for i in range(e - s):
                d = _widen(xs[i]) - bs[i]
                os[i] += (d if w[i] < threshold else zero) / divisor
        elif accumulate:
            for i in range(e - s):
                d = _widen(xs[i]) - bs[i]
                os[i] += d if w[i] < threshold else zero
        elif divide:
            for i in range(e - s):
                d = _widen(xs[i]) - bs[i]
                os[i] = (d if w[i] < threshold else zero) / divisor
        else:
            for i in range(e - s):
                d = _widen(xs[i]) - bs[i]
                os[i] = d if w[i] < threshold else zero


@numba.njit(**KERNEL)
def _della_delta(x, base, out, accumulate, stream, start, thresholds, divisors, shift, rescale, buf, narrow,
                narrow_bits, divs, keep, words):  # pragma: no cover (compiled)
    """DELLA's delta, tile by tile (della_delta says what; the tiles are scratch)."""
    _wide_vectors()
    n = out.shape[0]
    zero = out.dtype.type(0)
    tile = buf.shape[0]
    for s in range(0, n, tile):
        e = min(s + tile, n)
        w = tile_words(stream, start + s, e - s, words)
        xs, bs, os = x[s:e], base[s:e], out[s:e]
        for i in range(e - s):
            d = _widen(xs[i]) - bs[i]
            buf[i] = d
            narrow[i] = np.float32(d)
        # The lookups first (gathers), then the drop, the division and the sum in loops that
        # vectorise: with the division in the gather loop it took 5.5 ns per element.
        for i in range(e - s):
            b = (narrow_bits[i] & 0x7FFFFFFF) >> shift  # della.magnitude_bins: the pattern's top bits
            keep[i] = w[i] < thresholds[b]  # rng.bernoulli_mask's u < p, as rng.keep_threshold
            divs[i] = divisors[b]
        for i in range(e - s):
            buf[i] = buf[i] if keep[i] else zero  # keep_only: +0.0, NaN and inf too
        if rescale:  # then the division, as torch's div_ after keep_only
            for i in range(e - s):
                buf[i] = buf[i] / divs[i]
        for i in range(e - s):
            kept = buf[i]
            if accumulate:
                os[i] += kept
            else:
                os[i] = kept
