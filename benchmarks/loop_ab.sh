#!/usr/bin/env bash
# The Accelerate loop's speed at two commits on this machine, runs interleaved so that a machine's drift hits both:
# 300 steps of the built-in digits recipe each, no evaluation; prints the wall time and the median images/s of
# metrics.jsonl (the first logging window, which pays for start-up, left out). OLD_FLAGS and NEW_FLAGS add flags
# to one side's runs (for example the same commit with and without `--mixed_precision bf16`).
#   [OLD_FLAGS=...] [NEW_FLAGS=...] bash benchmarks/loop_ab.sh OLD_REF [NEW_REF (default: working tree)] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
old_ref=$1 new_ref=${2:-} rounds=${3:-2}
python=${PYTHON:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/old" >/dev/null 2>&1 || true; [ -n "$new_ref" ] && git worktree remove --force "$work/new" >/dev/null 2>&1; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/old" "$old_ref"
new_tree=$PWD
if [ -n "$new_ref" ]; then git worktree add -q --detach "$work/new" "$new_ref"; new_tree=$work/new; fi
export HF_HUB_OFFLINE=1
for round in $(seq "$rounds"); do
  for side in old new; do
    tree=$work/old flags=${OLD_FLAGS:-}
    [ "$side" = new ] && tree=$new_tree flags=${NEW_FLAGS:-}
    out=$work/run-$side-$round
    start=$(date +%s.%N)
    PYTHONPATH=$tree/src "$python" "$tree/examples/pretrain_msn.py" --max_train_steps 300 --skip_evaluation \
        --output_dir "$out" $flags > "$out.log" 2>&1
    end=$(date +%s.%N)
    "$python" - "$out/metrics.jsonl" "$side" "$round" "$start" "$end" <<'PYEOF'
import json, statistics, sys
path, side, run, start, end = sys.argv[1:]
rates = [json.loads(line)["images_per_second"] for line in open(path)][1:]
print(f"{side} round {run}: {float(end) - float(start):.1f} s, median {statistics.median(rates):.0f} images/s")
PYEOF
  done
done
