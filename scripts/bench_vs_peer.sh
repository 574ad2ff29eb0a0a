#!/usr/bin/env bash
# ftcore and torchtune 0.6.1 (the peer) under one benchmark protocol, in one go on one GPU machine,
# then a side-by-side markdown table with ratios (ftcore / torchtune).
#
# Usage: scripts/bench_vs_peer.sh [--model M] [--bs B] [--seq S] [--no-ac] [--no-table] [RUN ...]
#   RUN = SYSTEM:MODE:COMPILE[:MIN_S[:CAP_S[:FLAGS]]]
#         SYSTEM ftcore|peer, MODE full|lora|qlora, COMPILE eager|compile,
#         MIN_S: skip the run when fewer seconds than this remain before $BENCH_DEADLINE,
#         CAP_S: kill it after this many seconds (also never past $BENCH_DEADLINE),
#         FLAGS: more scripts/bench.py flags for this ftcore run, comma-separated (e.g. --fused,--offload).
#   Default runs: LoRA and QLoRA, eager and compiled, for both systems (8 runs).
# Environment: OUT (results go to $OUT/bench_results.jsonl and $OUT/bench_table.md; default ./bench_out),
#   BENCH_RESULTS (the JSONL to append to), BENCH_DEADLINE (epoch seconds; default: none),
#   BENCH_EXTRA_ARGS (more arguments for ftcore's runs only, e.g. "--device cpu --steps 2" in tests).
# Needs, inside the checkout (ignored by git, carried to the GPU machine): .peer/ (a copy of
# ../shared/peer), .peer_wheels/ (../shared/peer/fetch_wheels.sh .peer_wheels) and, for ftcore's
# own dependencies missing from the GPU image, .whl/ (omegaconf, antlr4, torchao, gguf).
set -uo pipefail
cd "$(dirname "$0")/.."

MODEL=llama3_1_8b BS=2 SEQ=2048 AC=1 TABLE=1
RUNS=()
while (($#)); do
  case $1 in
    --model) MODEL=$2; shift 2 ;;
    --bs) BS=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --no-ac) AC=0; shift ;;
    --no-table) TABLE=0; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    -*) echo "bench_vs_peer.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) RUNS+=("$1"); shift ;;
  esac
done
((${#RUNS[@]})) || RUNS=(ftcore:lora:eager peer:lora:eager ftcore:qlora:eager peer:qlora:eager
                         ftcore:lora:compile peer:lora:compile ftcore:qlora:compile peer:qlora:compile)

OUT_DIR=${OUT:-$PWD/bench_out}
mkdir -p "$OUT_DIR"
RESULTS=${BENCH_RESULTS:-$OUT_DIR/bench_results.jsonl}
DEADLINE=${BENCH_DEADLINE:-0}
PEER_SITE=/tmp/site            # where .peer/install_peer.sh puts torchtune (fixed by that script)
FTCORE_SITE=/tmp/ftcore_site   # ftcore's own missing dependencies, kept apart from the peer's
export PYTHONUNBUFFERED=1

stamp() { date -u +%H:%M:%S; }

# The peer goes into its own site folder, installed on first use (not at all when every peer run is
# skipped); ftcore's missing dependencies into another, so neither sees the other's packages.
ensure_peer() {
  [[ -d $PEER_SITE/torchtune ]] && return 0
  [[ -d .peer_wheels && -f .peer/install_peer.sh ]] || {
    echo "bench_vs_peer.sh: .peer/ or .peer_wheels/ missing; see the header of this script" >&2; return 1; }
  # In a child shell: install_peer.sh turns on `set -e`, which must not leak into this script.
  bash -c 'source .peer/install_peer.sh .peer_wheels'
}

ensure_ftcore_deps() {
  python3 -c "import omegaconf, gguf, torchao" 2>/dev/null && return 0
  [[ -d $FTCORE_SITE ]] && return 0
  [[ -d .whl ]] || { echo "bench_vs_peer.sh: ftcore's dependencies are missing and .whl/ is absent" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FTCORE_SITE" .whl/*.whl
}

# run_one SYSTEM MODE COMPILE MIN_S CAP_S: one benchmark process; its RESULT line is appended to $RESULTS.
run_one() {
  local system=$1 mode=$2 compile=$3 min_s=$4 cap_s=$5 flags=${6:-} args=(--model "$MODEL" --mode "$mode" --bs "$BS" --seq "$SEQ")
  ((AC)) && args+=(--ac)
  [[ $compile == compile ]] && args+=(--compile)
  local name="$system $MODEL $mode ${BS}x$SEQ ac=$AC $compile${flags:+ ${flags//,/ }}"
  if ((DEADLINE)); then
    local left=$((DEADLINE - $(date +%s)))
    if ((left < min_s)); then
      echo "[$(stamp)] SKIP $name: ${left}s left, needs ${min_s}s"
      echo "{\"run\": \"$name\", \"status\": \"skipped\", \"seconds_left\": $left}" >>"$RESULTS"
      return 0
    fi
    ((cap_s > left)) && cap_s=$left
  fi
  local cmd ensure=ensure_ftcore_deps
  [[ $system == peer ]] && ensure=ensure_peer
  if ! $ensure; then
    echo "[$(stamp)] FAILED to install the environment of $name"
    echo "{\"run\": \"$name\", \"status\": \"install failed\"}" >>"$RESULTS"
    return 0
  fi
  if [[ $system == peer ]]; then
    cmd=(env "PYTHONPATH=$PEER_SITE" python3 .peer/torchtune_step_bench.py "${args[@]}")
  else
    # shellcheck disable=SC2206  # BENCH_EXTRA_ARGS is split on purpose
    cmd=(env "PYTHONPATH=$PWD/src:$FTCORE_SITE" python3 scripts/bench.py "${args[@]}" ${flags//,/ } ${BENCH_EXTRA_ARGS:-})
  fi
  echo "[$(stamp)] START $name (cap ${cap_s}s): ${cmd[*]}"
  local start=$SECONDS log
  log=$(mktemp)
  timeout -k 10 "$cap_s" "${cmd[@]}" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} seconds=$((SECONDS - start))
  echo "[$(stamp)] END $name rc=$rc after ${seconds}s"
  if grep -q '^RESULT ' "$log"; then
    # Keep the run's wall time (build + compile + all steps) beside its protocol figures.
    grep '^RESULT ' "$log" | tail -1 | sed 's/^RESULT //' \
      | python3 -c "import json,sys; r=json.load(sys.stdin); r['wall_s']=$seconds; print(json.dumps(r))" >>"$RESULTS"
  else
    local status=failed
    ((rc == 124 || rc == 137)) && status=timeout
    echo "{\"run\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"wall_s\": $seconds}" >>"$RESULTS"
  fi
  rm -f "$log"
}

for run in "${RUNS[@]}"; do
  IFS=: read -r system mode compile min_s cap_s flags <<<"$run"
  if [[ ! $system =~ ^(ftcore|peer)$ || ! $mode =~ ^(full|lora|qlora)$ || ! $compile =~ ^(eager|compile)$ ]]; then
    echo "bench_vs_peer.sh: bad run '$run'; expected SYSTEM:MODE:COMPILE[:MIN_S[:CAP_S]] (see --help)" >&2
    exit 2
  fi
  if [[ -n ${flags:-} && $system != ftcore ]]; then
    echo "bench_vs_peer.sh: FLAGS are for ftcore runs only, got '$run'" >&2
    exit 2
  fi
  run_one "$system" "$mode" "$compile" "${min_s:-0}" "${cap_s:-600}" "${flags:-}"
done
if ((TABLE)); then
  PYTHONPATH=$PWD/src:$FTCORE_SITE python3 scripts/bench.py --table "$RESULTS" | tee "$OUT_DIR/bench_table.md"
fi
