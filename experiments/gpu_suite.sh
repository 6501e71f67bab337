#!/usr/bin/env bash
# The six anchor rows of ../shared/ANCHORS.md on one GPU: segjax beside PyTorch eager and torch.compile,
# one experiments/benchmark.py process per model (bf16, batch 16, 480x480, U2-Net 320x320, SGD train step).
#
#   experiments/gpu_suite.sh [RESULTS_DIR] [--dry-run] [--update-readme]
#
# RESULTS_DIR defaults to $OUT, else ./gpu_results. Each model writes RESULTS_DIR/<stem>.json (saved after
# the JAX part and after each PyTorch variant, so a model cut off by its timeout keeps what it measured)
# and RESULTS_DIR/logs/<model>.log; then RESULTS_DIR/README.md gets the README-style table and a
# side-by-side table, naming the card. The repository README is left alone unless --update-readme is
# given: then the results are copied into docs/bench_results/ and the README table is regenerated from
# there. --dry-run (or DRY_RUN=1) prints the commands and runs nothing.
#
# Budget: under 8 minutes in all on one H100/H200; every model has its own `timeout` (the sum of them,
# kill grace included, is 470 s), and warmup/iters/repeats are small because on a GPU compilation
# (XLA's and torch.compile's), not the timed steps, is what costs.
#
# Overrides for smoke tests and experiments (environment):
#   SUITE_SIZE (480) SUITE_U2NET_SIZE (320) SUITE_BATCH (16) SUITE_DTYPE (bfloat16)
#   SUITE_WARMUP (2) SUITE_ITERS (5) SUITE_REPEATS (3) SUITE_COMPILE (1: also torch.compile; 0: eager only)
#   SUITE_MODELS (space-separated subset, e.g. "unet u2net") SUITE_TIMEOUT_SCALE (1: multiplies each timeout)
#   SUITE_CONV (native|dense|auto: passed as --conv) SUITE_EXTRA (more benchmark.py arguments, e.g. --allow-busy)
#   SUITE_JAX_CACHE (a directory: JAX's persistent compilation cache, so a rerun with unchanged XLA_FLAGS
#   skips XLA's compilation; its compile_s then measures a cache hit)
#   PYTHON (python); XLA_FLAGS and the like pass through and are recorded in each result.
# CPU smoke test:
#   SUITE_SIZE=32 SUITE_U2NET_SIZE=32 SUITE_BATCH=2 SUITE_COMPILE=0 SUITE_EXTRA=--allow-busy \
#     experiments/gpu_suite.sh /tmp/suite
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR="" DRY=${DRY_RUN:-0} UPDATE_README=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --update-readme) UPDATE_README=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $arg (try --help)" >&2; exit 2 ;;
    *) [ -z "$DIR" ] || { echo "error: one results directory only (got $DIR and $arg)" >&2; exit 2; }; DIR=$arg ;;
  esac
done
DIR=${DIR:-${OUT:-./gpu_results}}
case $DRY in ""|0) DRY=0 ;; *) DRY=1 ;; esac

PYTHON=${PYTHON:-python}
SIZE=${SUITE_SIZE:-480} U2NET_SIZE=${SUITE_U2NET_SIZE:-320} BATCH=${SUITE_BATCH:-16} DTYPE=${SUITE_DTYPE:-bfloat16}
WARMUP=${SUITE_WARMUP:-2} ITERS=${SUITE_ITERS:-5} REPEATS=${SUITE_REPEATS:-3} COMPILE=${SUITE_COMPILE:-1}
SCALE=${SUITE_TIMEOUT_SCALE:-1}
# segjax from this checkout (the GPU machine may not have it installed); its twins come from tests/.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${SUITE_JAX_CACHE:-}" ] && export JAX_COMPILATION_CACHE_DIR=$SUITE_JAX_CACHE

# model | --model-kw | classes | size | timeout (s): the anchor rows, in ANCHORS.md's order
ROWS=(
  "fcn_resnet50|aux=True|21|$SIZE|75"
  "deeplabv3_resnet50|aux=True|21|$SIZE|75"
  "deeplabv3_resnet101|aux=True|21|$SIZE|90"
  "lraspp_mobilenet_v3_large||21|$SIZE|55"
  "unet|bilinear=True base_channels=32|2|$SIZE|55"
  "u2net||1|$U2NET_SIZE|90"
)
GRACE=5  # seconds between timeout's TERM and KILL

command_for() {  # model kw classes size -> benchmark.py's argument list, one per line
  local model=$1 kw=$2 classes=$3 size=$4
  printf '%s\n' "$ROOT/experiments/benchmark.py" --model "$model" --num-classes "$classes" --size "$size" \
    --batch "$BATCH" --dtype "$DTYPE" --warmup "$WARMUP" --iters "$ITERS" --repeats "$REPEATS" --torch --out "$DIR"
  [ "$COMPILE" = 1 ] && echo --torch-compile
  [ -n "$kw" ] && { echo --model-kw; tr ' ' '\n' <<<"$kw"; }
  [ -n "${SUITE_CONV:-}" ] && printf '%s\n' --conv "$SUITE_CONV"
  [ -n "${SUITE_EXTRA:-}" ] && tr ' ' '\n' <<<"$SUITE_EXTRA"
  return 0
}

selected() {  # is this model in SUITE_MODELS (or is there no selection)?
  [ -z "${SUITE_MODELS:-}" ] && return 0
  [[ " $SUITE_MODELS " == *" $1 "* ]]
}

if [ "$DRY" = 1 ]; then
  printf 'export PYTHONPATH=%q%s\n' "$PYTHONPATH" "${JAX_COMPILATION_CACHE_DIR:+ JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR}"
else
  mkdir -p "$DIR/logs"
fi
failed=() partial=() start=$SECONDS
for row in "${ROWS[@]}"; do
  IFS='|' read -r model kw classes size limit <<<"$row"
  selected "$model" || continue
  limit=$(awk -v t="$limit" -v s="$SCALE" 'BEGIN { printf "%d", t * s }')
  mapfile -t cmd < <(command_for "$model" "$kw" "$classes" "$size")
  if [ "$DRY" = 1 ]; then
    printf 'timeout -k %s %s %s' "$GRACE" "$limit" "$PYTHON"; printf ' %q' "${cmd[@]}"; printf ' > %q 2>&1\n' "$DIR/logs/$model.log"
    continue
  fi
  rm -f "$DIR/${model}_${size}x${size}_b${BATCH}_${DTYPE}_"*.json  # no stale result can pass for this run's
  t0=$SECONDS
  timeout -k "$GRACE" "$limit" "$PYTHON" "${cmd[@]}" >"$DIR/logs/$model.log" 2>&1
  rc=$?
  json=$(ls -t "$DIR/${model}_${size}x${size}_b${BATCH}_${DTYPE}_"*.json 2>/dev/null | head -n 1)
  if [ "$rc" = 0 ]; then status=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${limit}s"
  else status="failed (exit $rc)"; fi
  if [ "$rc" != 0 ]; then
    if [ -n "$json" ] && grep -q '"partial": true' "$json"; then partial+=("$model"); status+=", partial results kept"
    else failed+=("$model"); fi
    tail -n 5 "$DIR/logs/$model.log" | sed 's/^/    /'
  fi
  echo "$model: $status ($((SECONDS - t0)) s; log $DIR/logs/$model.log)"
done

TABLE_CMD=("$PYTHON" - "$DIR" "$ROOT")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${TABLE_CMD[@]}"; echo "<<'EOF'  # README-style table -> $DIR/README.md"
  [ "$UPDATE_README" = 1 ] && echo "cp $DIR/*.json $ROOT/docs/bench_results/ && $PYTHON $ROOT/experiments/benchmark.py --readme $ROOT/README.md --results $ROOT/docs/bench_results"
  exit 0
fi

"${TABLE_CMD[@]}" <<'EOF' || failed+=("table")
import importlib.util, json, subprocess, sys, time
from pathlib import Path

folder, root = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("bench_table", root / "experiments" / "bench_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)
results = [json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))]
if not results:
    raise SystemExit(f"error: no results (*.json) in {folder}")
cards = sorted({r.get("card", r["device"]) for r in results})
try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
except OSError:
    commit = ""
flags = sorted({r.get("xla_flags") or "(none)" for r in results})
text = (f"# segjax beside PyTorch: the anchor rows on {', '.join(cards)}\n\n"
        f"experiments/gpu_suite.sh, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"{', commit ' + commit if commit else ''}; XLA_FLAGS: {'; '.join(flags)}.\n\n"
        f"{table.README_BEGIN}\n{table.readme_table(results, str(folder))}\n{table.README_END}\n\n"
        f"## Images/s side by side\n\n{table.side_by_side(results)}\n")
(folder / "README.md").write_text(text)
print(text)
EOF

if [ "$UPDATE_README" = 1 ]; then
  cp "$DIR"/*.json "$ROOT/docs/bench_results/" &&
    "$PYTHON" "$ROOT/experiments/benchmark.py" --readme "$ROOT/README.md" --results "$ROOT/docs/bench_results" >/dev/null &&
    echo "updated $ROOT/README.md from $ROOT/docs/bench_results" || failed+=("readme")
fi
[ -f "$DIR/README.md" ] && table="table $DIR/README.md" || table="no table"
echo "suite: $((SECONDS - start)) s; $table${partial:+; partial: ${partial[*]}}${failed:+; FAILED: ${failed[*]}}"
[ ${#failed[@]} = 0 ]
