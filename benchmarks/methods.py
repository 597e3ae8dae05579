"""Time and peak memory of the library merge methods against the plain uniform merge, on the same inputs.

Run from the repository root:

    .venv/bin/python benchmarks/methods.py [--scales 8,4,2] [--repeats 2] [--workers 2] [--budget-s 240]
        [--profile] [--dir benchmarks/work/methods] [--full-dir benchmarks/work]
        [--json benchmarks/results/methods.json] [--markdown benchmarks/results/methods.md] [--keep]
    .venv/bin/python benchmarks/methods.py --scales 1      # full size, only where the extrapolation allows

1. Inputs: 8 SD1.5-layout fp16 checkpoints per scale, made by throughput.py's generator
   (`ensure_inputs`, in --dir, reused when an earlier --keep run left them). At a scale where
   --full-dir already holds complete generator files (the lead's `sd15-s1-0*.safetensors` at
   --scale 1), those are used read-only: never regenerated, never deleted.
2. Per scale, in one run: `astolfo-dist merge` of the 8 inputs by each method, warm page cache,
   through throughput.py's launcher and RSS sampler (wall time, peak RSS of the process tree,
   ru_maxrss), plus the CPU time of the process (user + sys, from this process's
   RUSAGE_CHILDREN: the launcher waits for the merge, so it is counted). The methods:
   `uniform` (no --method: the engine's streaming weighted sum, what `merge A B C` runs),
   `uniform_library` (`--method uniform`: the same average through the method library),
   `ties` (density 0.2) and `dare` (density 0.3, seed 1) over inputs 1-7 with input 8 as
   `--base` (the same 8 files read), `geometric_median` (defaults) over all 8. Runs are
   interleaved over methods, --repeats times; the best (least disturbed: the machine is shared)
   and the median are kept, and every time is also given relative to `uniform`. The read of
   every input that warms the page cache before each run is timed: the best warm one is the
   table's raw-read floor (2 threads, 16 MiB reads, throughput.py's `raw_read`).
3. Scales are run smallest (largest factor) first. Before each run at a new scale, the method's
   time there is extrapolated from the scales already measured (linear in input bytes through
   the two largest of them) and the run is skipped if the prediction exceeds --budget-s, and
   recorded as such. A run that goes past --timeout-s is killed and recorded as not finished.
4. --profile: at the largest scale of this run, each method once more under py-spy (native
   stacks, 100 Hz) in a child that also counts the statistic passes each tensor took; the
   samples are split into phases (reading inputs, selection passes, Philox, exact sums, ...) and
   into native work / Python interpreter / waiting for the GIL. Plus micro-benchmarks of the
   kernels per 512 Ki-element chunk (one thread).
5. Results of each scale are merged into --json (same settings; a scale measured again replaces
   the old one), so `--scales 8,4,2` then `--scales 1` build one report; --fresh starts over.
   Writes --markdown too.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import linecache
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import throughput as tp
import torch
from memory_vs_n import engine_source

import astolfo_dist

MIB = tp.MIB
LAYOUT = "sd15"
MODELS = 8
FULL_SCALE = 1
TARGET_RATIO = 2.0  # the issue: ties and dare within 2x the uniform merge
TARGETED = ("ties", "dare")


def method_specs(paths: list[Path]) -> dict[str, list[str]]:
    """The merge arguments of every benchmarked method (inputs included), in run order."""
    every, others, base = [str(p) for p in paths], [str(p) for p in paths[:-1]], str(paths[-1])
    return {
        "uniform": every,
        "uniform_library": [*every, "--method", "uniform"],
        "ties": [*others, "--base", base, "--method", "ties", "--set", "density=0.2"],
        "dare": [*others, "--base", base, "--method", "dare", "--set", "density=0.3", "--set", "seed=1"],
        "della": [*others, "--base", base, "--method", "della", "--set", "density=0.3", "--set", "seed=1"],
        "geometric_median": [*every, "--method", "geometric_median"],
    }


METHOD_NOTES = {
    "uniform": "no --method: the engine's streaming weighted sum (the reference)",
    "uniform_library": "--method uniform: the same average through the method library",
    "ties": "--method ties --set density=0.2; 7 models + --base (8 files)",
    "dare": "--method dare --set density=0.3 --set seed=1; 7 models + --base (8 files)",
    "della": "--method della --set density=0.3 --set seed=1 (epsilon 0.15, sign election); 7 models + --base",
    "geometric_median": "--method geometric_median (defaults: maxiter 100, tol 1e-6)",
}


def log(msg: str) -> None:
    print(f"[methods] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- inputs


def inputs_for(scale: int, folder: Path, full_dir: Path) -> tuple[list[Path], dict]:
    """The 8 inputs of a scale: complete generator files in full_dir (read-only), else made in folder."""
    shared = tp.input_paths(full_dir, MODELS, LAYOUT, scale)
    if all(tp.is_reusable(p, LAYOUT, scale, i + 1) for i, p in enumerate(shared)):
        return shared, {"generated": 0, "reused": MODELS, "read_only": True, "dir": str(full_dir)}
    paths = tp.input_paths(folder, MODELS, LAYOUT, scale)
    if scale == FULL_SCALE and not all(tp.is_reusable(p, LAYOUT, scale, i + 1) for i, p in enumerate(paths)):
        raise SystemExit(
            f"full size: no complete inputs in {full_dir} or {folder}; make them first (~17 GB, a few minutes) with "
            f"benchmarks/throughput.py --scale 1 --keep --dir {full_dir}"
        )
    gen = tp.ensure_inputs(paths, LAYOUT, scale)
    return paths, {**gen, "read_only": False, "dir": str(folder)}


# ----------------------------------------------------------------------------- one run


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_merge(args: list[str], output: Path, workers: int, extra: list[str], timeout_s: float) -> dict:
    """One `astolfo-dist merge` through throughput.py's launcher; killed after timeout_s."""
    cmd = [*tp.astolfo_cmd(), "merge", *args, "-o", str(output), "--overwrite", "-q", "--workers", str(workers)]
    cmd += extra
    fired = threading.Event()

    def kill() -> None:  # the merge process (the launcher's child), found by its output path
        fired.set()
        for p in psutil.Process().children(recursive=True):
            try:
                if str(output) in p.cmdline() and "-I" not in p.cmdline():
                    p.kill()
            except psutil.Error:
                pass

    timer = threading.Timer(timeout_s, kill)
    load0, cpu0 = os.getloadavg()[0], children_cpu_s()
    timer.start()
    try:
        r = tp.run_sampled(cmd)
    except SystemExit as exc:
        if not fired.is_set():
            raise
        return {"finished": False, "timeout_s": timeout_s, "error": str(exc).splitlines()[0]}
    finally:
        timer.cancel()
        if fired.is_set():
            for p in output.parent.glob(output.name + "*"):  # what the killed merge left
                p.unlink(missing_ok=True)
    r.pop("stdout")
    r["finished"] = True
    r["cpu_s"] = round(children_cpu_s() - cpu0, 3)
    r["loadavg_1m_before_after"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    r["output_bytes"] = output.stat().st_size
    return r


def summarise(runs: list[dict], input_bytes: int, startup_s: float) -> dict:
    done = [r for r in runs if r.get("finished")]
    if not done:
        return {"finished": False, "runs": len(runs), "timeout_s": runs[0].get("timeout_s")}
    best = min(r["seconds"] for r in done)
    return {
        "finished": True,
        "runs": len(done),
        "seconds_best": best,
        "seconds_median": round(statistics.median(r["seconds"] for r in done), 4),
        "seconds_excl_startup": round(best - startup_s, 4),
        "cpu_s_best": min(r["cpu_s"] for r in done),
        "gbps": round(input_bytes / best / 1e9, 3),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
        "ru_maxrss_mib": max(r["ru_maxrss_mib"] for r in done),
    }


def add_ratios(by_method: dict[str, dict]) -> None:
    ref = by_method.get("uniform")
    if not ref or not ref.get("finished"):
        return
    for r in by_method.values():
        if not r.get("finished"):
            continue
        r["vs_uniform"] = round(r["seconds_best"] / ref["seconds_best"], 2)
        r["vs_uniform_excl_startup"] = round(r["seconds_excl_startup"] / max(ref["seconds_excl_startup"], 1e-3), 2)
        r["vs_uniform_cpu"] = round(r["cpu_s_best"] / ref["cpu_s_best"], 2)


# ----------------------------------------------------------------------------- extrapolation


def line_through(p: tuple[float, float], q: tuple[float, float], x: float) -> tuple[float, float]:
    """(value at x, slope) of the line through p and q."""
    slope = (q[1] - p[1]) / (q[0] - p[0])
    return q[1] + slope * (x - q[0]), slope


def extrapolate(scales: dict[str, dict], method: str, scale: int, startup_s: float) -> dict | None:
    """Predicted wall time of `method` at `scale` from the smaller scales measured (None: fewer than 2)."""
    target_bytes = MODELS * (tp.data_bytes(LAYOUT, scale) + (1 << 20))
    pts = sorted(
        (s["input_bytes"], s["methods"][method]["seconds_excl_startup"], int(k))
        for k, s in scales.items()
        if int(k) > scale and s["methods"].get(method, {}).get("finished")
    )
    if len(pts) < 2:
        return None
    (x1, y1, s1), (x2, y2, s2) = pts[-2], pts[-1]
    value, slope = line_through((x1, y1), (x2, y2), target_bytes)
    out = {
        "from_scales": [s1, s2],
        "slope_s_per_gb": round(slope * 1e9, 2),
        "predicted_s": round(startup_s + max(value, y2), 1),
    }
    by_scale = {s: (x, y) for x, y, s in pts}
    if 8 in by_scale and 4 in by_scale and [s1, s2] != [8, 4]:
        v84, slope84 = line_through(by_scale[8], by_scale[4], target_bytes)
        out["predicted_s_from_8_4"] = round(startup_s + v84, 1)
        out["slope_s_per_gb_from_8_4"] = round(slope84 * 1e9, 2)
    return out


# ----------------------------------------------------------------------------- profile

# Runs the CLI like `astolfo-dist` does and records, per tensor of a method with statistic
# passes, (numel, passes taken): argv[1] is where to write them, the rest is the CLI's argv.
COUNTING_CHILD = """
import json, sys, threading
from astolfo_dist.cli import main
from astolfo_dist.recipe.library import base
passes, lock, end_pass = {}, threading.Lock(), base.Method.end_pass
def counted(self, state, pass_index):
    end_pass(self, state, pass_index)
    if self.ready(state):
        with lock:
            passes[state.key] = [state.numel, state.pass_index]
base.Method.end_pass = counted
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(passes, f)
sys.exit(code)
"""

GIL_WAIT = ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread", "gil_scoped_release::~gil_scoped_release")
NATIVE_LIBS = ("libtorch", "libc10", "libgomp", "libc.so", "libm.so", "libstdc++", "libmkl", "libopenblas")
SRC_ROOT = Path(astolfo_dist.__file__).resolve().parent.parent


def _name(frame: str) -> str:
    return frame.split(" (", 1)[0]


def _source(frame: str) -> str:
    """The source line of a Python frame 'func (path.py:LINE)', stripped."""
    try:
        loc = frame.rsplit(" (", 1)[1].rstrip(")")
        path, line = loc.rsplit(":", 1)
        return linecache.getline(str(SRC_ROOT / path), int(line)).strip()
    except (IndexError, ValueError):
        return ""


# Samples in a compiled CPU kernel, by the kernel's Python wrapper, in the order tested.
_KERNEL_PHASES = (
    ("band_gather", "selection passes: the first pass's band (band_gather)"),
    ("topk_sides_group", "combine: ties, a group of inputs as read into the election sums, then the pick "
                         "(topk_sides_group)"),
    ("sides_finish", "combine: fused election pick, lambda and base (sides_finish)"),
    ("drop_delta_", "combine: dare fused delta (sub, Philox mask, rescale, add)"),
    ("topk_delta", "combine: ties fused masked delta (sub, top-k mask)"),
    ("della_delta", "combine: della fused delta (sub, rank bin, Philox mask, rescale)"),
    ("sides_add", "combine: fused sign election sums"),
)
# Samples in the torch paths (a GPU's, or methods without kernels), after della's rank histogram.
_TORCH_PHASES = (
    (("random_u32", "uniform01"), "Philox RNG: rng.random_u32"),
    (("bernoulli_mask",), "keep mask: dare u < p"),
    (("ExactSum.add", "exact_dot"), "exact sums: |x_i - z|^2, superaccumulator"),
    (("GeometricMedian._estimate",), "estimate: weighted average z"),
)


def phase(frames: list[str]) -> str:
    """Which part of the merge a worker sample is in, as 'group: detail' (frames root first, py-spy's names)."""
    names = [_name(f) for f in frames]
    has = set(names).__contains__
    if any(n.endswith("reader.<locals>.read") or n in ("_read_chunks", "read_into") or n.endswith(".read_into")
           for n in names) or names[-1:] == ["_TensorGraph._value"]:  # the graph's read: pread, then the copy
        return "read inputs: pread + fp16->fp32 copy"
    for kernel, label in _KERNEL_PHASES:  # a compiled kernel on the stack names the phase (in this order)
        if has(kernel):
            return label
    if has("digit_histogram") and not has("Selection.feed"):
        return "statistic pass: della fused rank histogram (digit_histogram)"
    for kernels, label in _TORCH_PHASES:
        if any(map(has, kernels)):
            return label
    if has("Selection.feed"):
        i = names.index("Selection.feed")
        callee = names[i + 1] if i + 1 < len(names) else ""
        if callee == "magnitude_bits":
            return "selection passes: magnitude patterns of the delta"
        if callee.endswith("positions"):
            return "selection passes: nonzero (prefix filter, tie positions)"
        if callee == "Selection._feed_histogram_fused":
            return "selection passes: fused histogram (digit_histogram)"
        if callee == "Selection._record_chunk":
            return "selection passes: per-chunk tie records"
        src = _source(frames[i])
        for key, label in (
            ("index_add_", "selection passes: histogram of digits"),
            ("bincount", "selection passes: histogram of digits"),
            ("aminmax", "selection passes: min/max key"),
            ("self.prefix", "selection passes: nonzero (prefix filter, tie positions)"),
            ("index_select", "selection passes: filter by prefix (index_select)"),
            ("digit_bits", "selection passes: digit extraction"),
            ("_append", "selection passes: collect candidates"),
            ("arange", "selection passes: collect candidates"),
        ):
            if key in src:
                return label
        return "selection passes: other"
    if any(n.endswith("._end_pass") or n == "Selection.end_pass" for n in names):
        return "end of pass: per-tensor (thresholds, ranking candidates)"
    if has("TopKResult.mask") or has("Selection.mask"):
        return "keep mask: ties top-k mask in the output (magnitude bits again)"
    if has("Method.observe"):
        return "statistic pass, other: base clone, delta = x_i - base"
    if has("_reduce_chunk"):
        return "reduce: uniform convert + add"
    if has("_emit"):
        return "write: output chunks"
    if any(n.endswith(".output") or n.endswith("weighted_delta") for n in names):
        return "combine: output delta, sign election, mix"
    return "other: chunk loop, Python"


def analyse_profile(raw: Path) -> dict:
    """Sample counts by phase and by kind (native / interpreter / GIL) from py-spy --format raw output."""
    phases: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    main_thread: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()  # by the innermost engine source line
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        names = [_name(f) for f in frames]
        if "run_shard" not in names:
            importing = any("_find_and_load" in f for f in frames)
            main_thread["imports (startup)" if importing else "plan, setup, waiting for the workers"] += n
            continue
        py = [f for f in frames if ".py:" in f]
        phases[phase(py)] += n
        ours = [f for f in py if "astolfo_dist/" in f]
        if ours:
            lines[f"{_name(ours[-1])}: {_source(ours[-1])}"] += n
        leaf = frames[-1]
        if any(g in stack for g in GIL_WAIT):
            kinds["worker: waiting for the GIL"] += n
        elif ".py:" in leaf or "libpython" in leaf:
            kinds["worker: Python interpreter"] += n
        elif any(lib in leaf for lib in NATIVE_LIBS):
            kinds["worker: native (torch kernels, libc: copies, malloc)"] += n
        else:
            kinds["worker: other native"] += n

    worker = sum(phases.values())

    def table(counter: collections.Counter[str], top: int | None = None) -> list[dict]:
        return [{"what": k, "samples": v, "share": round(v / max(worker, 1), 4)} for k, v in counter.most_common(top)]

    return {
        "worker_samples": worker,
        "main_thread_samples": dict(main_thread),
        "phases": table(phases),  # shares of the worker threads' samples
        "kinds": table(kinds),
        "lines": table(lines, 15),
    }


def pass_summary(passes: dict[str, list[int]]) -> dict:
    if not passes:
        return {}
    hist = collections.Counter(p for _n, p in passes.values())
    elems = sum(n for n, _p in passes.values())
    return {
        "tensors": len(passes),
        "tensors_by_passes": {str(k): hist[k] for k in sorted(hist)},
        "element_weighted_mean_passes": round(sum(n * p for n, p in passes.values()) / elems, 2),
        "largest_tensor": max(passes.values()),
    }


def profile_method(name: str, args: list[str], output: Path, workers: int, extra: list[str]) -> dict:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return {"error": f"{spy} not found (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        raw, counts = Path(tmp) / "raw.txt", Path(tmp) / "passes.json"
        child = [sys.executable, "-c", COUNTING_CHILD, str(counts), "merge", *args, "-o", str(output)]
        child += ["--overwrite", "-q", "--workers", str(workers), *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(spy), "record", "--native", "--format", "raw", "-r", "100", "-o", str(raw), "--", *child],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        output.unlink(missing_ok=True)
        if proc.returncode != 0 or not raw.exists():
            return {"error": f"py-spy exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
        out = {"seconds_under_py_spy": round(seconds, 2), **analyse_profile(raw)}
        if counts.exists():
            out["passes"] = pass_summary(json.loads(counts.read_text()))
    log(f"profiled {name}: {out['worker_samples']} worker samples")
    return out


def _best_s(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _kernels(n: int) -> dict:
    """The kernels behind each method on one chunk of n elements (float32, like the accumulator)."""
    from astolfo_dist.recipe.library import _fused
    from astolfo_dist.recipe.library._exact import ExactSum, exact_dot
    from astolfo_dist.recipe.library._select import Selection
    from astolfo_dist.recipe.rng import bernoulli_mask, drop_delta_

    gen = torch.Generator().manual_seed(0)
    x16 = (torch.randn(n, generator=gen) * 0.5).half()
    x, y, z = torch.randn(n, generator=gen), torch.empty(n), torch.randn(n, generator=gen)
    score, neg = torch.zeros(n), torch.zeros(n)

    def feed(later: bool):
        # A histogram pass, whatever n is (no band: a GPU's passes, or a CPU's where the band is dropped)
        sel = Selection(n * 64, n * 13, inert_zeros=True, band_cap=0)
        sel.dtype = torch.float32
        if later:  # the second pass: the first digit is known
            sel.known, sel.prefix = sel._digit_bits(), 500

        def run() -> None:
            sel.feed(x, 0)
            sel.hist = sel.kmin = sel.kmax = None

        return run

    settled = Selection(n, n // 5, inert_zeros=True)
    while not settled.done:
        settled.feed(x, 0)
        settled.end_pass()
    acc = ExactSum()
    hist = torch.zeros(1 << 16, dtype=torch.int32)
    keys = (x - z).abs().view(torch.int32) >> 15
    digit = int(keys.kthvalue(max(1, n - n // 5)).values)  # x - z's threshold digit at density 0.2
    slots = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    mix, pos_w, neg_w = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    group = torch.cat([x16.roll(17 * i) for i in range(7)]).view(torch.uint8)  # seven chunks as read, fused_election's
    z16 = z.half()
    bands = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
    # The election's sums as finish sees them (fresh: the sums above grow with every timed call).
    sums = [torch.randn(n, generator=gen) for _ in range(3)] + [torch.rand(n, generator=gen) for _ in range(2)]
    return {
        "uniform, per input: fp16 -> fp32 copy_ + add_": lambda: y.copy_(x16).add_(x),
        "dare, per input: fused delta on the CPU (rng.drop_delta_)":
            lambda: drop_delta_(y, x, z, 1, 0, "key", 0, 0.3, 0.3, accumulate=True),
        "dare, per input: Philox keep mask, the GPU's path (bernoulli_mask)":
            lambda: bernoulli_mask(1, 0, "key", 0, n, 0.3),
        "ties, per input and pass: Selection.feed, first pass (histogram)": feed(False),
        "ties, per input and pass: Selection.feed, later pass (prefix filter + histogram)": feed(True),
        "ties, per input, first pass: x (fp16, as read) - base and histogram on the CPU (_fused.digit_histogram)":
            lambda: _fused.digit_histogram(x16, 0, 0, 31, 16, hist, None, base=z),
        "ties, per input, first pass: x (fp16, as read) - base and a 3-digit band on the CPU (_fused.band_gather)":
            lambda: _fused.band_gather(x16, z, 15, digit - 1, digit + 1, *slots, 0),
        "ties, per input, first chunk: a histogram of 1 in 8 keys, to choose the band (_fused.sample_histogram)":
            lambda: _fused.sample_histogram(x16, z, 15, hist, 8 * _fused.SAMPLE_BLOCK),
        "ties, per input, in output: fused masked delta on the CPU (_fused.topk_delta)":
            lambda: _fused.topk_delta(y, x, z, 0, settled.result, accumulate=False),
        "ties, per input, in output: fused election sums on the CPU (_fused.sides_add)":
            lambda: _fused.sides_add(x, score, y, neg, False, None, 1.0),
        "ties, per chunk of 7 inputs, in output: as read (fp16) into the election sums, then the pick "
        "(_fused.topk_sides_group)":
            lambda: _fused.topk_sides_group(group, 7, torch.float16, 2 * n, z, 0, [settled.result] * 7, [1.0] * 7,
                                            score, mix, neg, False, (pos_w, neg_w), first=True, lambda_=1.0),
        "ties, per chunk of 7 inputs, in output: the same with the base as read (fp16)":
            lambda: _fused.topk_sides_group(group, 7, torch.float16, 2 * n, z16, 0, [settled.result] * 7, [1.0] * 7,
                                            score, mix, neg, False, (pos_w, neg_w), first=True, lambda_=1.0),
        "ties, per chunk of 7 inputs, first pass: as read (fp16), the base too, 3-digit bands "
        "(_fused.band_gather_group)":
            lambda: _fused.band_gather_group(group, list(range(7)), torch.float16, 2 * n, z16, torch.float32, 0,
                                             [(15, digit - 1, digit + 1)] * 7, [bands[0]] * 7, [bands[1]] * 7),
        "ties, per chunk, in output: election pick, lambda, + base (_fused.sides_finish, and a copy_)":
            lambda: _fused.sides_finish(sums[0], sums[1].copy_(x), sums[2], (sums[3], sums[4]), 0.3, z),
        "ties, per input, in output: Selection.mask (the GPU's path)": lambda: settled.mask(x, 0),
        "geometric_median, per input and iteration: exact_dot(d, d)": lambda: exact_dot(x, x, acc),
    }


def micro_benchmarks(sizes: tuple[int, ...] = (512 << 10, 1024)) -> dict:
    """ms per call and ns per element of each kernel, one thread, best of 15."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        by_size = {}
        for n in sizes:
            times = {k: _best_s(fn) for k, fn in _kernels(n).items()}
            by_size[str(n)] = {
                k: {"ms": round(t * 1e3, 4), "ns_per_elem": round(t / n * 1e9, 2)} for k, t in times.items()
            }
    finally:
        torch.set_num_threads(threads)
    return {"threads": 1, "by_size": by_size}


# ----------------------------------------------------------------------------- report


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def verdict(res: dict) -> dict:
    """TIES and DARE <= 2x uniform, judged at the largest scale where both ran (full size if so)."""
    out = {}
    for method in TARGETED:
        for scale in sorted(res["scales"], key=int):
            r = res["scales"][scale]["methods"].get(method, {})
            if r.get("finished") and "vs_uniform" in r:
                out[method] = {
                    "scale": int(scale),
                    "vs_uniform": r["vs_uniform"],
                    "vs_uniform_excl_startup": r["vs_uniform_excl_startup"],
                    "target": f"<= {TARGET_RATIO:g}",
                    "pass": r["vs_uniform"] <= TARGET_RATIO,
                    "full_size": int(scale) == FULL_SCALE,
                }
                break
    return out


def optional_settings(cfg: dict) -> str:
    """The merge options a run set beyond the defaults, as text for the table's heading."""
    parts = [f", --{name.replace('_', '-')} {cfg[name]:g}" for name in ("chunk_mb", "tensor_cache_mb")
             if cfg.get(name) is not None]
    executor = cfg.get("executor", "local")
    return (f", --executor {executor}" if executor != "local" else "") + "".join(parts)


def markdown(res: dict) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [
        f"Merge methods, {res['date_utc']}: {MODELS} {LAYOUT} fp16 checkpoints per scale, --workers {cfg['workers']}"
        f", --device {cfg.get('device', 'cpu')}{optional_settings(cfg)}"
        f"{', --memory ' + cfg['memory'] if cfg['memory'] else ', default --memory'}, warm page cache, best of "
        f"{cfg['repeats']} interleaved runs per method ({cfg['full_repeats']} at full size; median in brackets). "
        f"{m['cpu']}, {m['cores']} cores, "
        f"{m['ram_gb']} GB RAM{', ' + m['gpu'] if m.get('gpu') else ''}; "
        f"torch {res['versions']['torch']}, Python {res['versions']['python']}; "
        f"engine {res['engine_source'].get('commit', '?')[:10]}"
        f"{' + uncommitted changes' if res['engine_source'].get('astolfo_dist_uncommitted_changes') else ''}.",
        "",
        "| scale | input GB | method | wall s | vs uniform | vs uniform excl. startup | CPU s | vs uniform CPU "
        "| peak RSS sampled (MiB) | ru_maxrss (MiB) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scale in sorted(res["scales"], key=int, reverse=True):
        s = res["scales"][scale]
        for name, r in s["methods"].items():
            head = f"| 1/{scale} | {s['input_bytes'] / 1e9:.3f} | {name} |"
            if r.get("skipped"):
                lines.append(f"{head} not run: {r['skipped']} | | | | | | |")
            elif not r.get("finished"):
                lines.append(f"{head} did not finish within {r.get('timeout_s')} s | | | | | | |")
            else:
                lines.append(
                    f"{head} {r['seconds_best']:.2f} ({r['seconds_median']:.2f}) | {_f(r.get('vs_uniform'), '.2f')}x "
                    f"| {_f(r.get('vs_uniform_excl_startup'), '.1f')}x | {r['cpu_s_best']:.1f} "
                    f"| {_f(r.get('vs_uniform_cpu'), '.2f')}x | {r['peak_rss_mib']:.0f} | {r['ru_maxrss_mib']:.0f} |"
                )
        st = s["startup"]
        lines.append(
            f"| 1/{scale} | | startup only (`astolfo-dist --version`) | {st['seconds']:.2f} | | | | "
            f"| {st['peak_rss_mib']:.0f} | {st['ru_maxrss_mib']:.0f} |"
        )
        if floor := s.get("raw_read"):
            lines.append(
                f"| 1/{scale} | | raw-read floor: every input once, 2 threads, 16 MiB reads, warm "
                f"| {floor['seconds']:.2f} | | | | | | |"
            )
    ex = res.get("extrapolations", {})
    if ex:
        lines += [
            "",
            "Extrapolation to the next scale (linear in input bytes through the two largest scales measured "
            "before it, + startup), and the decision:",
            "",
            "| to scale | method | from scales | slope (s/GB) | predicted wall s | from 1/8 and 1/4 only (s) "
            "| run? | measured wall s |",
            "|---:|---|---|---:|---:|---:|---|---:|",
        ]
        for scale in sorted(ex, key=int, reverse=True):
            for name, e in ex[scale].items():
                got = res["scales"].get(scale, {}).get("methods", {}).get(name, {})
                measured = f"{got['seconds_best']:.1f}" if got.get("finished") else "-"
                lines.append(
                    f"| 1/{scale} | {name} | 1/{e['from_scales'][0]}, 1/{e['from_scales'][1]} "
                    f"| {e['slope_s_per_gb']:.1f} | {e['predicted_s']:.0f} "
                    f"| {_f(e.get('predicted_s_from_8_4'), '.0f')} "
                    f"| {'yes' if e['run'] else 'no (over --budget-s)'} | {measured} |"
                )
    v = res.get("verdict", {})
    if v:
        lines += [
            "",
            "| target | measured at | wall vs uniform | excl. startup | goal | result |",
            "|---|---|---:|---:|---|---|",
        ]
        for method, r in v.items():
            where = "full size" if r["full_size"] else f"scale 1/{r['scale']} (full size not run)"
            lines.append(
                f"| {method} time / uniform time | {where} | {r['vs_uniform']:.2f}x "
                f"| {r['vs_uniform_excl_startup']:.1f}x "
                f"| {r['target']} | {'PASS' if r['pass'] else 'FAIL'} |"
            )
    prof = res.get("profile")
    if prof:
        lines += [
            "",
            f"Profile at scale 1/{prof['scale']}"
            f"{', ' + prof['date_utc'] + ', engine ' + prof['engine'] if 'engine' in prof else ''}"
            " (py-spy --native, 100 Hz, --workers as above; shares of the worker "
            "threads' samples; main-thread samples, mostly the imports and the plan, are counted apart):",
            "",
        ]
        for name, p in prof["methods"].items():
            if "error" in p:
                lines.append(f"- {name}: {p['error']}")
                continue
            groups: collections.Counter[str] = collections.Counter()
            for x in p["phases"]:
                groups[x["what"].split(":")[0]] += x["share"]
            top = "; ".join(f"{x['what']} {x['share']:.0%}" for x in p["phases"][:8])
            top = "; ".join(f"{k} {v:.0%}" for k, v in groups.most_common()) + f" (in detail: {top})"
            kinds = "; ".join(f"{x['what']} {x['share']:.0%}" for x in p["kinds"])
            passes = p.get("passes", {})
            extra = (
                f" Passes per tensor: {passes['tensors_by_passes']} (element-weighted mean "
                f"{passes['element_weighted_mean_passes']})."
                if passes
                else ""
            )
            main = ", ".join(f"{k} {v}" for k, v in p["main_thread_samples"].items())
            lines.append(
                f"- **{name}** ({p['worker_samples']} worker samples; main thread: {main}): {top}. "
                f"By kind: {kinds}.{extra}"
            )
            if name in TARGETED:
                lines += [f"  - {x['share']:.1%} `{x['what']}`" for x in p.get("lines", [])[:10]]
        micro = prof.get("micro", {}).get("by_size", {})
        if micro:
            sizes = list(micro)
            lines += [
                "",
                "Kernels, one thread, best of 15 (ns per element at " + " / ".join(sizes) + " elements per call):",
                "",
                "| kernel | " + " | ".join(f"ns/elem @ {s}" for s in sizes) + " |",
                "|---|" + "---:|" * len(sizes),
            ]
            for k in micro[sizes[0]]:
                lines.append(f"| {k} | " + " | ".join(f"{micro[s][k]['ns_per_elem']:.2f}" for s in sizes) + " |")
    if res["notes"]:
        lines += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


NOTES = [
    "wall s: the whole `astolfo-dist merge` process (interpreter and torch import included), best of the runs "
    "(median in brackets); CPU s: its user + sys time (best); peak RSS sampled: the summed RSS of its process tree "
    "every ~20 ms; ru_maxrss: its own high-water mark from wait4 (max of the runs)",
    "ratios: best wall (or CPU) time over that of the `uniform` merge run in the same invocation, same scale, same "
    "files; 'excl. startup' subtracts `astolfo-dist --version` (best of 3) from both",
    "inputs: throughput.py's generator (windows of one random N(0, 0.5) pool at seeded offsets), 8 files per scale; "
    "ties and dare merge files 1-7 onto file 8 as --base, uniform and geometric_median merge all 8",
]


def settings(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "memory": args.memory, "device": args.device, "executor": args.executor,
            "chunk_mb": args.chunk_mb,
            "tensor_cache_mb": args.tensor_cache_mb, "layout": LAYOUT, "models": MODELS}


def merge_options(args: argparse.Namespace) -> list[str]:
    """The `astolfo-dist merge` options every run of this benchmark gets."""
    return [
        *(["--memory", args.memory] if args.memory else []),
        *(["--chunk-mb", str(args.chunk_mb)] if args.chunk_mb else []),
        *(["--tensor-cache-mb", str(args.tensor_cache_mb)] if args.tensor_cache_mb is not None else []),
        "--device",
        args.device,
        *(["--executor", args.executor] if args.executor != "local" else []),
    ]


def load_previous(path: Path, args: argparse.Namespace) -> dict | None:
    if args.fresh or not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # The defaults of the settings added later, for results made before they existed.
    defaults = {"device": "cpu", "executor": "local", "chunk_mb": None, "tensor_cache_mb": None}
    old_settings = {**defaults, **old.get("config", {})}
    if {k: old_settings.get(k) for k in settings(args)} != settings(args):
        raise SystemExit(
            f"{path} holds results made with other settings: pass --fresh to replace it, or another --json"
        )
    return old


def plan_scale(res: dict, methods: list[str], scale: int, startup_s: float, budget_s: float) -> dict[str, str | None]:
    """Per method: None (run it) or why not, from the extrapolation of the larger scale factors measured."""
    measured = {k: v for k, v in res["scales"].items() if int(k) > scale}
    plan: dict[str, str | None] = {}
    ex: dict[str, dict] = {}
    for name in methods:
        e = extrapolate(measured, name, scale, startup_s)
        plan[name] = None
        if e is not None:
            e["run"] = e["predicted_s"] <= budget_s or name == "uniform"
            ex[name] = e
            if not e["run"]:
                plan[name] = (
                    f"predicted {e['predicted_s']:.0f} s (from scales 1/{e['from_scales'][0]} and "
                    f"1/{e['from_scales'][1]}) > --budget-s {budget_s:g}"
                )
    if ex:
        res["extrapolations"].setdefault(str(scale), {}).update(ex)
    return plan


def measure_scale(
    args: argparse.Namespace, res: dict, scale: int, methods: list[str], startup: dict, generated: list[Path]
) -> None:
    folder = Path(args.dir)
    output = folder / "merged.safetensors"
    extra = merge_options(args)
    plan = plan_scale(res, methods, scale, startup["seconds"], args.budget_s)
    todo = [m for m in methods if plan[m] is None]
    log(f"scale 1/{scale}: running {', '.join(todo)}; not running: {[m for m in methods if plan[m]]}")
    paths, gen = inputs_for(scale, folder, Path(args.full_dir))
    if not gen["read_only"] and gen["generated"]:
        generated += paths
    sizes = [p.stat().st_size for p in paths]
    notes = []
    if sum(sizes) + sizes[0] > psutil.virtual_memory().available * 0.9:
        notes.append(f"scale 1/{scale}: inputs + output do not fit the available memory; runs partly cold")
    specs = method_specs(paths)
    runs: dict[str, list[dict]] = {m: [] for m in todo}
    floors: list[dict] = []
    repeats = args.full_repeats if scale == FULL_SCALE else args.repeats
    for rep in range(repeats):
        for name in todo:
            if runs[name] and not runs[name][-1].get("finished"):
                continue  # timed out once: not again
            log(f"scale 1/{scale}: {name}, run {rep + 1}/{repeats}")
            # Warm: every run starts with its inputs in the page cache; timed, the read floor.
            floors.append(tp.raw_read(paths, 2, 16 * MIB))
            r = run_merge(specs[name], output, args.workers, extra, args.timeout_s)
            if name == "uniform" and r.get("finished") and rep == 0:
                r["spot_check"] = tp.spot_check(paths, output)
                if not r["spot_check"]["ok"]:
                    notes.append(f"scale 1/{scale}: uniform spot check FAILED: {r['spot_check']['mismatched']}")
            output.unlink(missing_ok=True)
            runs[name].append(r)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    by_method: dict[str, dict] = {}
    for name in methods:
        if plan[name]:
            by_method[name] = {"finished": False, "skipped": plan[name]}
        else:
            by_method[name] = {**summarise(runs[name], sum(sizes), startup["seconds"]), "date_utc": now}
    add_ratios(by_method)
    entry = res["scales"].setdefault(str(scale), {"methods": {}, "runs": {}, "notes": []})
    entry.update({"input_bytes": sum(sizes), "model_bytes": sizes[0], "inputs": gen, "startup": startup})
    if len(floors) > 1:  # the first read may be cold: only the warm ones are the floor
        entry["raw_read"] = min(floors[1:], key=lambda r: r["seconds"])
    entry.setdefault("engine_source_by_method", {}).update(dict.fromkeys(todo, engine_source()))
    entry["methods"] = {**entry["methods"], **by_method}  # methods not run now keep their earlier result
    entry["methods"] = {m: entry["methods"][m] for m in METHOD_NOTES if m in entry["methods"]}
    entry["runs"].update(runs)
    entry["notes"] = sorted(set(entry["notes"]) | set(notes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--scales",
        default="8,4,2",
        help="scale factors, comma-separated (1 = full size; default 8,4,2); 'none' with --profile: only profile",
    )
    ap.add_argument(
        "--methods",
        default=",".join(METHOD_NOTES),
        help="subset of the methods, comma-separated (uniform always runs: it is the reference)",
    )
    ap.add_argument("--workers", type=int, default=2, help="astolfo-dist merge --workers (default 2)")
    ap.add_argument("--memory", default="", help="astolfo-dist merge --memory (default: the engine's default)")
    ap.add_argument("--device", default="cpu", help="astolfo-dist merge --device: cpu or cuda (default cpu)")
    ap.add_argument("--executor", default="local", help="astolfo-dist merge --executor: local or ray (default local)")
    ap.add_argument("--chunk-mb", type=float, help="astolfo-dist merge --chunk-mb (default: the engine's default)")
    ap.add_argument("--tensor-cache-mb", type=float, help="astolfo-dist merge --tensor-cache-mb (default: engine's)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method and scale, interleaved (default 2)")
    ap.add_argument("--full-repeats", type=int, default=1, help="runs per method at scale 1 (default 1)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip a run predicted to take longer (default 240)")
    ap.add_argument("--timeout-s", type=float, default=420.0, help="kill a run that takes longer (default 420)")
    ap.add_argument("--profile", type=int, metavar="SCALE", help="py-spy every method once at this scale")
    ap.add_argument("--dir", default="benchmarks/work/methods", help="folder for generated inputs and the output")
    ap.add_argument("--full-dir", default="benchmarks/work", help="complete generator files here are used read-only")
    ap.add_argument("--json", default="benchmarks/results/methods.json")
    ap.add_argument("--markdown", default="benchmarks/results/methods.md")
    ap.add_argument("--fresh", action="store_true", help="ignore what an earlier run left in --json")
    ap.add_argument("--keep", action="store_true", help="keep the inputs this run generated")
    args = ap.parse_args(argv)
    text = "" if args.scales == "none" else args.scales
    scales = sorted({int(s) for s in text.split(",") if s.strip()}, reverse=True)
    methods = [m for m in args.methods.split(",") if m]
    if (not scales and args.profile is None) or any(s < 1 for s in scales) or args.workers < 1:
        ap.error("need positive --scales (or --scales none --profile SCALE) and --workers")
    if args.repeats < 1 or args.full_repeats < 1:
        ap.error("need positive --repeats and --full-repeats")
    if unknown := set(methods) - set(METHOD_NOTES):
        ap.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHOD_NOTES)}")
    if "uniform" not in methods:
        methods.insert(0, "uniform")
    methods = [m for m in METHOD_NOTES if m in methods]

    folder = Path(args.dir)
    created_dir = not folder.exists()
    output = folder / "merged.safetensors"
    res = load_previous(Path(args.json), args) or {"scales": {}, "extrapolations": {}}
    generated: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        startup = min((tp.run_sampled([*tp.astolfo_cmd(), "--version"]) for _ in range(3)), key=lambda r: r["seconds"])
        startup.pop("stdout")
        for scale in scales:
            measure_scale(args, res, scale, methods, startup, generated)
        if args.profile is not None:
            paths, gen = inputs_for(args.profile, folder, Path(args.full_dir))
            if not gen["read_only"] and gen["generated"]:
                generated += paths
            specs = method_specs(paths)
            extra = merge_options(args)
            profile = res.setdefault("profile", {"scale": args.profile, "methods": {}})
            if profile["scale"] != args.profile:
                profile.update(scale=args.profile, methods={})
            for name in methods:
                log(f"profiling {name} at scale 1/{args.profile}")
                tp.raw_read(paths, 2, 16 * MIB)
                profile["methods"][name] = profile_method(name, specs[name], output, args.workers, extra)
            log("micro-benchmarks")
            profile["micro"] = micro_benchmarks()
            profile["engine"] = engine_source().get("commit", "?")[:10]
            profile["date_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    finally:
        for p in folder.glob(output.name + "*"):
            p.unlink(missing_ok=True)
        if not args.keep:
            tp.remove_inputs(generated, folder, created_dir)  # inputs read from --full-dir are never in it

    if scales or "config" not in res:  # a profile-only run leaves the tables' settings as they were
        res.update(
            {
                "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "machine": {
                    **tp.machine_info(Path(args.full_dir)),
                    "loadavg_at_end": list(os.getloadavg()),
                    **({"gpu": torch.cuda.get_device_name()} if args.device.startswith("cuda") else {}),
                },
                "versions": tp.versions(),
                "config": {
                    **settings(args),
                    "repeats": args.repeats,
                    "full_repeats": args.full_repeats,
                    "budget_s": args.budget_s,
                    "timeout_s": args.timeout_s,
                    "methods": METHOD_NOTES,
                    "command": [
                        *tp.astolfo_cmd(),
                        "merge",
                        "MODEL...",
                        "-o",
                        "OUT",
                        "--overwrite",
                        "-q",
                        "--workers",
                        str(args.workers),
                        *(["--memory", args.memory] if args.memory else []),
                    ],
                },
                "engine_source": engine_source(),
            }
        )
    res["verdict"] = verdict(res)
    res["notes"] = NOTES + [n for s in res["scales"].values() for n in s.get("notes", [])]
    tp.write_results(res, markdown(res), args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
