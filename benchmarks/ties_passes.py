"""Where TIES's time goes beyond uniform's: its statistic pass against its output pass.

Run from the repository root, with the 8 full-size inputs of methods.py in --dir:

    .venv/bin/python benchmarks/ties_passes.py [--dir benchmarks/work] [--repeats 3]
        [--json benchmarks/results/ties_passes.json] [--markdown benchmarks/results/ties_passes.md]

Each run is `astolfo_dist.cli.main(["merge", ...])` in a child process of its own, after the
start-up objects are frozen out of the collector as the command does (cli.entry), timed from
the call to its return (no interpreter start-up; CPU time from getrusage, all threads):

* `uniform`: the 8 inputs averaged (what methods.py calls uniform);
* `ties`: TIES (density 0.2) over inputs 1-7 onto input 8, as methods.py runs it;
* `ties_output`: the same merge with every tensor's thresholds taken from a recording made
  beforehand (one untimed TIES run that keeps each tensor's settled state): the output pass
  alone, each input read once. This is instrumentation (worker._TensorGraph.settle replaced in
  the child), not a way to merge: it says how much of TIES is its statistic pass.

Runs are interleaved (uniform, ties, ties_output) --repeats times; the best of each is kept.
Every output must have the bytes of the plain `ties` run (checked with sha256), so the replayed
thresholds are the real ones. Needs ~2 GB of free disk for the outputs and the recording.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import throughput as tp

CHILD = r"""
import json, pickle, resource, sys, time
from pathlib import Path
mode, record, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
args = json.loads(sys.argv[4])
import gc
from astolfo_dist import worker
from astolfo_dist.cli import main
gc.freeze()  # as the astolfo-dist command does before main (cli.entry)
settle = worker._TensorGraph.settle
states = {}
if mode == "record":
    def recording(self):
        settle(self)
        states[self.tensor.name] = self.states
    worker._TensorGraph.settle = recording
elif mode == "ties_output":
    replayed = pickle.loads(record.read_bytes())
    def replaying(self):
        self.states = replayed[self.tensor.name]
    worker._TensorGraph.settle = replaying
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
rc = main(["merge", *args, "-o", out, "--overwrite", "-q", "--workers", "2"])
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
if mode == "record":
    record.write_bytes(pickle.dumps(states))
print(json.dumps({"rc": rc, "wall_s": t1 - t0, "user_s": r1.ru_utime - r0.ru_utime,
                  "sys_s": r1.ru_stime - r0.ru_stime}))
"""

MODES = ("uniform", "ties", "ties_output")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def run_child(mode: str, record: Path, out: Path, args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(record), str(out), json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="benchmarks/work")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/ties_passes.json")
    ap.add_argument("--markdown", default="benchmarks/results/ties_passes.md")
    opts = ap.parse_args(argv)
    paths = tp.input_paths(Path(opts.dir), 8, "sd15", 1)
    if not all(tp.is_reusable(p, "sd15", 1, i + 1) for i, p in enumerate(paths)):
        raise SystemExit(f"needs the 8 full-size inputs of methods.py in {opts.dir} (throughput.ensure_inputs)")
    files = [str(p) for p in paths]
    args = {"uniform": files, "ties": [*files[:7], "--base", files[7], "--method", "ties", "--set", "density=0.2"]}
    args["ties_output"] = args["record"] = args["ties"]
    with tempfile.TemporaryDirectory(dir=opts.dir) as tmp:
        record = Path(tmp) / "thresholds.pkl"
        reference = Path(tmp) / "ties-reference.safetensors"
        tp.log("recording every tensor's thresholds (untimed TIES run)")
        run_child("record", record, reference, args["record"])
        expected = sha256(reference)
        reference.unlink()
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(opts.repeats):
            for mode in MODES:
                out = Path(tmp) / f"{mode}.safetensors"
                result = run_child(mode, record, out, args[mode])
                result["cpu_s"] = result["user_s"] + result["sys_s"]
                if mode != "uniform":
                    result["same_bytes_as_ties"] = sha256(out) == expected
                    if not result["same_bytes_as_ties"]:
                        raise SystemExit(f"{mode}: output differs from the recorded TIES run")
                out.unlink()
                runs[mode].append(result)
                tp.log(f"{mode} run {r + 1}: {result['wall_s']:.2f} s, CPU {result['cpu_s']:.2f} s")
    best = {m: min(rs, key=lambda x: x["wall_s"]) for m, rs in runs.items()}
    uni = best["uniform"]
    res = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": tp.machine_info(Path(opts.dir)),
        "repeats": opts.repeats,
        "runs": runs,
        "best": {m: {**b, "vs_uniform": b["wall_s"] / uni["wall_s"], "cpu_vs_uniform": b["cpu_s"] / uni["cpu_s"]}
                 for m, b in best.items()},
    }
    m = res["machine"]
    lines = [
        f"TIES's passes, {res['date_utc']}: 8 full-size SD1.5 fp16 checkpoints, --workers 2, in-process (no start-up), "
        f"best of {opts.repeats} interleaved runs. {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM.",
        "",
        "| run | wall s | vs uniform | CPU s (user + sys) | user s | sys s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"uniform": "uniform (8 inputs)", "ties": "TIES (7 onto a base), both passes",
             "ties_output": "TIES, output pass alone (thresholds replayed)"}
    for mode in MODES:
        b = res["best"][mode]
        lines.append(f"| {names[mode]} | {b['wall_s']:.2f} | {b['vs_uniform']:.2f}x | {b['cpu_s']:.2f} | "
                     f"{b['user_s']:.2f} | {b['sys_s']:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(res, indent=2) + "\n")
    Path(opts.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
