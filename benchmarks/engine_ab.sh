#!/usr/bin/env bash
# Engine against engine: uniform and TIES at full size, whole command, interleaved rounds.
#
#   bash benchmarks/engine_ab.sh OLD_COMMIT [ROUNDS]     # from the repository root; ~1 min per round, +40 s
#   WORKERS=1 bash benchmarks/engine_ab.sh ...            # one worker thread: no GIL contention, less noise
#
# Needs methods.py's 8 full-size inputs in benchmarks/work (see benchmarks/README.md). The old
# engine runs from a temporary git worktree of OLD_COMMIT (removed at exit), the new one from
# this checkout, both as `python -m astolfo_dist` with this venv (so an old engine needs no
# console script of its own). Each round warms the page cache, then runs uniform (old, new)
# and TIES (old, new; density 0.2, inputs 1-7 onto input 8) and prints one line per run:
# label, wall s, user s, sys s (GNU time). Outputs go to a temporary file, deleted after each run.
set -euo pipefail
old=${1:?usage: engine_ab.sh OLD_COMMIT [ROUNDS]}
rounds=${2:-3}
root=$(git rev-parse --show-toplevel)
py="$root/.venv/bin/python"
work="$root/benchmarks/work"
inputs=("$work"/sd15-s1-0{1..8}.safetensors)
for f in "${inputs[@]}"; do [ -f "$f" ] || { echo "missing $f (make methods.py's full-size inputs first)" >&2; exit 2; }; done
tree=$(mktemp -d)
out=$(mktemp -u --suffix=.safetensors)
trap 'rm -f "$out"; git -C "$root" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git -C "$root" worktree add --detach "$tree" "$old" >/dev/null

run() {  # label, engine folder, merge arguments...
  local label=$1 dir=$2
  shift 2
  (cd "$dir" && PYTHONPATH="$dir" /usr/bin/time -f "$label %e s user %U sys %S" "$py" -m astolfo_dist merge "$@" \
    -o "$out" --overwrite -q --workers "${WORKERS:-2}" 2>&1 >/dev/null | tail -n 1)
  rm -f "$out"
}

ties=("${inputs[@]:0:7}" --method ties --base "${inputs[7]}" --set density=0.2)
# Untimed: a worktree has no numba cache yet, and its first TIES compiles the kernels (~3 s).
run "warm-up_old" "$tree" "${ties[@]}" >/dev/null
run "warm-up_new" "$root" "${ties[@]}" >/dev/null
for _ in $(seq 1 "$rounds"); do
  cat "${inputs[@]}" >/dev/null
  run "uniform_old" "$tree" "${inputs[@]}"
  run "uniform_new" "$root" "${inputs[@]}"
  run "ties_old" "$tree" "${ties[@]}"
  run "ties_new" "$root" "${ties[@]}"
done
