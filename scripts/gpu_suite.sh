#!/usr/bin/env bash
# Everything ftcore measures on a GPU, in ONE call of at most ~8.5 minutes (the device limit is 10).
#
# Usage (repository root of the GPU machine): scripts/gpu_suite.sh [PLAN]
#   all  (default)  GPU-marked tests, NF4 checks and NF4 benchmark, then the headline benchmarks:
#                   8B LoRA and QLoRA (bs 2 x 2048, activation checkpointing) ftcore eager beside
#                   torchtune compiled, 1B generation speed, 3B full fine-tune, then as time allows
#                   ftcore compiled, torchtune eager and 3B compiled.
#   rest            what `all` rarely reaches: ftcore compiled and torchtune eager 8B LoRA/QLoRA,
#                   3B full fine-tune compiled.
#   big             Llama-3.1-70B-shape QLoRA at bs 1 x 2048: ftcore eager, torchtune compiled.
#   headline        no tests: 8B LoRA and QLoRA, compiled and eager, and 3B full, both systems.
#   profile         no tests: one profiled step of 8B LoRA (eager, compiled), 8B QLoRA and 3B full.
#   switches        GPU tests, NF4 benchmark, each speed/memory switch's effect, 8B QLoRA long context.
#   final           the side-by-side table with torchtune (compiled) and the long-context full-depth check.
#   graphs          the CUDA-graph GPU tests, then ftcore eager + fused + cuda_graphs beside torchtune
#                   compiled (8B LoRA, QLoRA, 3B full), ftcore eager + fused alone, the NF4 load peak.
#   graphs2         all GPU tests, then the same pairs again after the fused linear + cross-entropy of
#                   frozen output weights (one graphed LoRA step profiled), and ftcore compiled 8B.
#   graphs_memory   the CUDA-graph tests, and the reserved memory of graphed 8B LoRA and 3B full runs.
#   memory          the changed GPU tests, the NF4 load peak (chunked quantization), graphed 3B full
#                   (gradients assigned by the graph) beside eager and torchtune compiled, and one eager
#                   8B LoRA step profiled with its copies and adds by input shape.
#   inplace         the changed GPU tests, then graphed eager 8B LoRA (profiled) and QLoRA beside torchtune
#                   compiled after the adapters' in-place addmm.
#   verify          all GPU tests, the NF4 load peak, ftcore compiled 8B LoRA and QLoRA beside torchtune
#                   compiled LoRA.
#   lora_node       the GPU tests that train LoRA, then graphed eager 8B LoRA (profiled) and QLoRA beside
#                   torchtune compiled, and eager 8B LoRA without graphs, after the one-node LoRA layer.
#   selective       the selective-checkpointing GPU tests, then graphed eager 8B LoRA and QLoRA and 3B full
#                   with ac_option op (GEMM outputs kept) beside torchtune compiled, 3B full every 2.
#   context         8B QLoRA at batch 1 x 344,064 tokens with all 32 blocks (offloading + chunked MLP), under
#                   an 80 GB card's memory (--memory-cap-gib 79): one step, ~6 minutes. SUITE_BUDGET_S=570.
#   skiplast        the selective-checkpointing GPU tests, graphed 3B full with the last 14 / 20 blocks
#                   unchecked beside torchtune compiled, and 8B QLoRA `op` beside torchtune compiled QLoRA.
#   recheck         all GPU tests, then graphed eager 8B LoRA and QLoRA beside torchtune compiled (the
#                   first GPU run of the previous session's last cuda_graphs and NF4 fixes).
#   embedding       all GPU tests, then graphed eager 8B QLoRA without and with offload_embedding (and the
#                   freed memory spent on the last 2 blocks unchecked) beside torchtune compiled QLoRA.
#   embedding_lora  the same for 8B LoRA, no tests.
#   embedding_70b   Llama-3.1-70B QLoRA at bs 1 x 2048 without and with offload_embedding (and 4 or 6 blocks
#                   unchecked) beside torchtune compiled, no tests.
#   unchecked       the ac_offload_blocks GPU tests, 70B QLoRA (graphs; 40 and 48 blocks offloaded) beside
#                   torchtune compiled, then as time allows 8B LoRA and QLoRA with 8 blocks offloaded.
#   inback          all GPU tests, then compiled 3B full with optimizer_in_backward (no gradients kept)
#                   and the last 20 / 23 blocks unchecked beside torchtune compiled.
# Each step has a minimum and a cap in seconds and runs only when its minimum fits before the
# suite's deadline (SUITE_BUDGET_S, default 510 s); a failing step never stops the next one.
# Writes into $OUT (default ./gpu_out): suite.log (everything printed), results.jsonl (one JSON
# per benchmark run or skipped/failed step), bench_table.md, nf4_checks.json, bench_nf4.json.
# Carry to the GPU machine: .peer .peer_wheels .whl .bnb_wheel (see docs/performance.md).
set -uo pipefail
cd "$(dirname "$0")/.."

PLAN=${1:-all}
[[ $PLAN =~ ^(all|rest|big|headline|profile|switches|final|graphs|graphs2|graphs_memory|memory|inplace|verify|lora_node|recheck|selective|context|skiplast|inback|embedding|embedding_lora|embedding_70b|unchecked)$ ]] || { echo "gpu_suite.sh: unknown plan '$PLAN'; use all, rest, big, headline, profile, switches, final, graphs, graphs2, graphs_memory, memory, inplace, verify, lora_node, recheck, selective, context, skiplast, inback, embedding, embedding_lora, embedding_70b or unchecked" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu_out}
export OUT
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + ${SUITE_BUDGET_S:-510}))
RESULTS=$OUT/results.jsonl
FTCORE_SITE=/tmp/ftcore_site
BNB_SITE=/tmp/bnb_site
export PYTHONUNBUFFERED=1 BENCH_RESULTS=$RESULTS BENCH_DEADLINE=$DEADLINE
exec > >(tee -a "$OUT/suite.log") 2>&1

stamp() { echo "$(date -u +%H:%M:%S) +$(($(date +%s) - START))s"; }

# step NAME MIN_S CAP_S CMD...: run CMD when MIN_S seconds remain, for at most CAP_S (or what is left).
step() {
  local name=$1 min_s=$2 cap_s=$3 left=$((DEADLINE - $(date +%s)))
  shift 3
  if ((left < min_s)); then
    echo "[$(stamp)] SKIP $name: ${left}s left, needs ${min_s}s"
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"seconds_left\": $left}" >>"$RESULTS"
    return 0
  fi
  ((cap_s > left)) && cap_s=$left
  echo "[$(stamp)] START $name (cap ${cap_s}s)"
  local begin=$SECONDS
  timeout -k 10 "$cap_s" "$@"
  local rc=$?
  echo "[$(stamp)] END $name rc=$rc after $((SECONDS - begin))s"
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - begin))}" >>"$RESULTS"
}

setup() {
  echo "[$(stamp)] plan=$PLAN budget=${SUITE_BUDGET_S:-510}s"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # ftcore's dependencies that the GPU image lacks (omegaconf, gguf, torchao), apart from the peer's.
  [[ -d .whl ]] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$FTCORE_SITE" .whl/*.whl
  # bitsandbytes, only for the checks that compare NF4 bytes with it.
  if [[ -d .bnb_wheel ]] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$BNB_SITE" .bnb_wheel/*.whl; then
    BNB_PATH=":$BNB_SITE"
  fi
  # `timeout` runs commands, not shell functions: the environment travels as an `env` prefix.
  PY=(env "PYTHONPATH=$PWD/src:$FTCORE_SITE${BNB_PATH:-}" python3)
  echo "[$(stamp)] setup done"
}

checks() {
  step "pytest -m gpu" 20 60 "${PY[@]}" -m pytest -m gpu -v -v -p no:cacheprovider --continue-on-collection-errors \
    --durations=5 -rs tests
  [[ -f scripts/gpu_nf4_checks.py ]] && step "gpu_nf4_checks" 15 40 "${PY[@]}" scripts/gpu_nf4_checks.py --out "$OUT/nf4_checks.json"
  [[ -f scripts/bench_nf4.py ]] && step "bench_nf4" 15 40 "${PY[@]}" scripts/bench_nf4.py --out "$OUT/bench_nf4.json"
}

vs_peer() { bash scripts/bench_vs_peer.sh --no-table "$@"; }

generation() {
  step "generate 1B bs1" 20 60 "${PY[@]}" scripts/bench.py --model llama3_2_1b --generate 128 --prompt-len 128 \
    --out "$OUT/generate.json"
  [[ -f $OUT/generate.json ]] && cat "$OUT/generate.json" >>"$RESULTS" && rm "$OUT/generate.json"
}

# Each run: SYSTEM:MODE:COMPILE:MIN_S:CAP_S (bench_vs_peer.sh skips it when MIN_S no longer fits).
plan_all() {
  checks
  # Pairs first (ftcore eager beside torchtune compiled), so a short run still yields complete ratios.
  vs_peer ftcore:lora:eager:45:100 peer:lora:compile:120:210 ftcore:qlora:eager:60:130 peer:qlora:compile:150:240
  generation
  vs_peer --model llama3_2_3b ftcore:full:eager:35:90 peer:full:eager:40:90
  vs_peer ftcore:lora:compile:100:200 ftcore:qlora:compile:120:220 peer:lora:eager:45:90 peer:qlora:eager:60:120
}

plan_rest() {
  vs_peer ftcore:lora:compile:100:200 ftcore:qlora:compile:120:220 peer:lora:eager:45:90 peer:qlora:eager:60:120
  vs_peer --model llama3_2_3b ftcore:full:compile:90:180 peer:full:compile:100:200
}

# The headline table, no tests: every 8B LoRA/QLoRA pair and the 3B full pair, compiled first.
plan_headline() {
  vs_peer ftcore:lora:compile:40:90 peer:lora:compile:50:100 ftcore:qlora:compile:40:90 peer:qlora:compile:50:100
  vs_peer ftcore:lora:eager:30:60 peer:lora:eager:30:60 ftcore:qlora:eager:30:70 peer:qlora:eager:40:90
  vs_peer --model llama3_2_3b ftcore:full:compile:40:90 peer:full:compile:50:100 ftcore:full:eager:25:60
}

# Where a step's time goes: one profiled step each of 8B LoRA eager and compiled, 8B QLoRA eager and
# 3B full eager (kernel tables by device time in $OUT/prof_*.txt).
plan_profile() {
  vs_peer ftcore:lora:eager:40:90:--profile,$OUT/prof_lora_eager.txt \
    ftcore:lora:compile:60:150:--profile,$OUT/prof_lora_compile.txt \
    ftcore:qlora:eager:40:100:--profile,$OUT/prof_qlora_eager.txt
  vs_peer --model llama3_2_3b ftcore:full:eager:30:80:--profile,$OUT/prof_full3b_eager.txt
  vs_peer peer:lora:compile:100:160
}

# The speed and memory switches: GPU tests, the NF4 benchmark, then each switch's effect (eager fused
# 8B LoRA/QLoRA, optimizer in backward on 3B full, compiled + fused), and 8B QLoRA long context with
# offloading + chunked MLP: 64K with all 32 blocks and with 4, then >= 342K with 4 blocks (one block's
# working set does not depend on the depth once the block inputs are offloaded; docs/performance.md).
plan_switches() {
  step "pytest -m gpu" 60 150 "${PY[@]}" -m pytest -m gpu -v -p no:cacheprovider --continue-on-collection-errors \
    --durations=8 -rs tests/gpu
  step "bench_nf4" 30 100 "${PY[@]}" scripts/bench_nf4.py --out "$OUT/bench_nf4.json"
  vs_peer ftcore:lora:eager:30:80:--fused ftcore:qlora:eager:30:90:--fused,--profile,$OUT/prof_qlora_fused.txt
  local long=--fused,--offload,--mlp-chunk,8192,--warm,1,--steps,1
  vs_peer --bs 1 --seq 65536 ftcore:qlora:eager:60:120:$long,--memory-cap-gib,79 \
    ftcore:qlora:eager:30:60:$long,--n-layers,4
  vs_peer --bs 1 --seq 344064 ftcore:qlora:eager:70:150:--fused,--offload,--mlp-chunk,8192,--warm,0,--steps,1,--n-layers,4
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:--fused,--optimizer-in-backward
  vs_peer ftcore:lora:compile:45:90:--fused ftcore:lora:eager:25:60:--fused,--offload
}

# The side-by-side table of this session (2026-12-01, H200): torchtune compiled beside ftcore compiled,
# ftcore eager with the fused kernels, and with offloading (memory); the long-context proxy checked at
# full depth (64K, all 32 blocks); the GPU tests and NF4 rows changed since the switches run.
plan_final() {
  step "pytest -m gpu (changed)" 30 80 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs tests/gpu/test_cuda.py \
    tests/gpu/test_nf4_matmul_cuda.py tests/gpu/test_fused_kernels_cuda.py \
    tests/gpu/test_activation_offload_cuda.py::test_offloading_and_chunking_lower_peak_memory_at_long_context
  step "bench_nf4 quick" 30 60 "${PY[@]}" scripts/bench_nf4.py --quick --models 8B --out "$OUT/bench_nf4.json"
  vs_peer peer:lora:compile:60:100 ftcore:lora:compile:50:90 ftcore:lora:eager:20:60:--fused \
    ftcore:lora:eager:20:60:--fused,--offload
  vs_peer peer:qlora:compile:60:100 ftcore:qlora:compile:50:90 \
    ftcore:qlora:eager:20:60:--fused,--profile,$OUT/prof_qlora_fused_twin.txt
  vs_peer --bs 1 --seq 65536 ftcore:qlora:eager:50:100:--fused,--offload,--mlp-chunk,8192,--warm,1,--steps,1,--memory-cap-gib,79
  vs_peer --model llama3_2_3b peer:full:compile:50:90 ftcore:full:compile:40:80 ftcore:full:eager:15:50:--fused
}

# Eager without launch overhead (2026-12-02): the CUDA-graph tests, then each graphed eager run beside
# torchtune compiled in the same call, the same runs without graphs (the switch's gain), then the peak
# memory of loading an 8B HF checkpoint into QLoRA and the NF4 checks (bitsandbytes bytes when carried).
plan_graphs() {
  step "pytest cuda graphs" 40 150 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_cuda_graphs_cuda.py
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs peer:lora:compile:60:110 \
    ftcore:qlora:eager:25:70:--fused,--cuda-graphs peer:qlora:compile:60:110
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:--fused,--cuda-graphs peer:full:compile:50:100
  vs_peer ftcore:lora:eager:20:50:--fused ftcore:qlora:eager:20:50:--fused
  step "bench_load 8B qlora" 60 120 "${PY[@]}" scripts/bench_load.py --model llama3_1_8b --mode qlora --dir /tmp/ckpt_8b
  [[ -f scripts/gpu_nf4_checks.py ]] && step "gpu_nf4_checks" 15 40 "${PY[@]}" scripts/gpu_nf4_checks.py --out "$OUT/nf4_checks.json"
}

plan_graphs2() {
  step "pytest -m gpu" 60 180 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=8 tests/gpu
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs,--profile,$OUT/prof_lora_graphs.txt peer:lora:compile:60:110 \
    ftcore:qlora:eager:25:70:--fused,--cuda-graphs peer:qlora:compile:60:110
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:--fused,--cuda-graphs peer:full:compile:50:100
  vs_peer ftcore:lora:compile:40:90 ftcore:qlora:compile:40:90
}

plan_graphs_memory() {
  step "pytest cuda graphs" 30 90 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs tests/gpu/test_cuda_graphs_cuda.py
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:--fused,--cuda-graphs
}

plan_memory() {
  step "pytest changed" 40 150 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_cuda.py tests/gpu/test_cuda_graphs_cuda.py
  step "bench_load 8B qlora" 60 150 "${PY[@]}" scripts/bench_load.py --model llama3_1_8b --mode qlora --dir /tmp/ckpt_8b
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:--fused,--cuda-graphs ftcore:full:eager:15:50:--fused \
    peer:full:compile:50:100
  vs_peer ftcore:lora:eager:25:60:--fused,--profile,$OUT/prof_lora_eager_ops.txt
}

plan_inplace() {
  step "pytest changed" 40 150 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_cuda.py tests/gpu/test_cuda_graphs_cuda.py tests/gpu/test_fused_kernels_cuda.py
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs,--profile,$OUT/prof_lora_graphs.txt peer:lora:compile:60:110 \
    ftcore:qlora:eager:25:70:--fused,--cuda-graphs peer:qlora:compile:60:110
}

plan_verify() {
  step "pytest -m gpu" 60 240 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 tests/gpu
  step "bench_load 8B qlora" 60 120 "${PY[@]}" scripts/bench_load.py --model llama3_1_8b --mode qlora --dir /tmp/ckpt_8b
  vs_peer ftcore:lora:compile:40:90 ftcore:qlora:compile:40:90 peer:lora:compile:50:100
}

plan_lora_node() {
  step "pytest LoRA" 40 170 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_cuda.py tests/gpu/test_cuda_graphs_cuda.py tests/gpu/test_fused_kernels_cuda.py \
    tests/gpu/test_activation_offload_cuda.py
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs,--profile,$OUT/prof_lora_node.txt peer:lora:compile:60:110 \
    ftcore:qlora:eager:25:70:--fused,--cuda-graphs peer:qlora:compile:60:110 ftcore:lora:eager:20:50:--fused
}

plan_recheck() {
  step "pytest -m gpu" 60 250 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=8 tests/gpu
  vs_peer ftcore:lora:eager:25:70:--fused,--cuda-graphs peer:lora:compile:60:110 \
    ftcore:qlora:eager:25:70:--fused,--cuda-graphs peer:qlora:compile:60:110
}

plan_selective() {
  step "pytest selective" 40 150 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_selective_checkpoint_cuda.py
  local op=--fused,--cuda-graphs,--ac-option,op
  vs_peer ftcore:lora:eager:25:70:$op peer:lora:compile:60:110 ftcore:qlora:eager:25:70:$op
  vs_peer --model llama3_2_3b ftcore:full:eager:20:60:$op ftcore:full:eager:20:60:--fused,--cuda-graphs,--ac-option,2 \
    peer:full:compile:40:100
}

plan_context() {
  vs_peer --bs 1 --seq 344064 \
    ftcore:qlora:eager:300:600:--fused,--offload,--mlp-chunk,8192,--warm,0,--steps,1,--memory-cap-gib,79
}

plan_skiplast() {
  step "pytest selective" 30 90 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 \
    tests/gpu/test_selective_checkpoint_cuda.py
  local graphs=--fused,--cuda-graphs
  vs_peer --model llama3_2_3b ftcore:full:eager:15:40:$graphs,--ac-skip-last,14 \
    ftcore:full:eager:15:40:$graphs,--ac-skip-last,20 peer:full:compile:30:80
  vs_peer ftcore:qlora:eager:20:50:$graphs,--ac-option,op peer:qlora:compile:40:90
}

plan_inback() {
  step "pytest -m gpu" 60 250 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=5 tests/gpu
  local inback=--optimizer-in-backward,--ac-skip-last
  vs_peer --model llama3_2_3b ftcore:full:compile:30:90:$inback,20 ftcore:full:compile:30:90:$inback,23 \
    peer:full:compile:40:100
}

plan_embedding() {
  step "pytest -m gpu" 60 250 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs --durations=8 tests
  local graphs=--fused,--cuda-graphs
  vs_peer ftcore:qlora:eager:25:60:$graphs ftcore:qlora:eager:25:60:$graphs,--offload-embedding \
    ftcore:qlora:eager:25:60:$graphs,--offload-embedding,--ac-skip-last,2 peer:qlora:compile:60:110
}

plan_embedding_lora() {
  local graphs=--fused,--cuda-graphs
  vs_peer ftcore:lora:eager:25:60:$graphs ftcore:lora:eager:25:60:$graphs,--offload-embedding \
    ftcore:lora:eager:25:60:$graphs,--offload-embedding,--ac-skip-last,2 \
    ftcore:lora:eager:25:60:$graphs,--offload-embedding,--ac-skip-last,3 peer:lora:compile:60:110
}

plan_embedding_70b() {  # the peer first: its compile is the longest part, and each run needs the pair
  local graphs=--fused,--cuda-graphs host=--fused,--cuda-graphs,--offload-embedding
  vs_peer --model llama3_1_70b --bs 1 peer:qlora:compile:120:200 ftcore:qlora:eager:60:120:$graphs \
    ftcore:qlora:eager:60:120:$host ftcore:qlora:eager:60:120:$host,--ac-skip-last,4 \
    ftcore:qlora:eager:60:120:$host,--ac-skip-last,6
}

plan_unchecked() {  # ac_offload_blocks: its GPU tests, 70B QLoRA beside torchtune compiled, then 8B if time is left
  step "pytest offload" 30 60 "${PY[@]}" -m pytest -m gpu -q -p no:cacheprovider -rs \
    tests/gpu/test_unchecked_offload_cuda.py
  local host=--fused,--offload-embedding
  vs_peer --model llama3_1_70b --bs 1 peer:qlora:compile:120:200 ftcore:qlora:eager:50:90:$host,--cuda-graphs \
    ftcore:qlora:eager:50:90:$host,--ac-offload-blocks,40 ftcore:qlora:eager:50:90:$host,--ac-offload-blocks,48
  vs_peer ftcore:lora:eager:25:40:$host,--ac-offload-blocks,8 ftcore:qlora:eager:25:40:$host,--ac-offload-blocks,8
}

plan_big() {
  vs_peer --model llama3_1_70b --bs 1 ftcore:qlora:eager:120:280 peer:qlora:compile:200:330
}

setup
case $PLAN in
  all) plan_all ;;
  rest) plan_rest ;;
  big) plan_big ;;
  headline) plan_headline ;;
  profile) plan_profile ;;
  switches) plan_switches ;;
  final) plan_final ;;
  graphs) plan_graphs ;;
  graphs2) plan_graphs2 ;;
  graphs_memory) plan_graphs_memory ;;
  memory) plan_memory ;;
  inplace) plan_inplace ;;
  verify) plan_verify ;;
  lora_node) plan_lora_node ;;
  recheck) plan_recheck ;;
  selective) plan_selective ;;
  context) plan_context ;;
  skiplast) plan_skiplast ;;
  inback) plan_inback ;;
  embedding) plan_embedding ;;
  embedding_lora) plan_embedding_lora ;;
  embedding_70b) plan_embedding_70b ;;
  unchecked) plan_unchecked ;;
esac
echo "[$(stamp)] side by side (ratios are ftcore / torchtune):"
"${PY[@]}" scripts/bench.py --table "$RESULTS" | tee "$OUT/bench_table.md"
grep '"kind": "generate"' "$RESULTS" || true
echo "[$(stamp)] suite done"
