#!/usr/bin/env bash
# GPU checks and benchmark of cuda_graphs=True with recompute="mlp" (train/saved_graphs.py), in two
# device calls of under 10 minutes each (docs/perf-notes.md says what to look for). Logs go to $OUT
# (the device tool's output folder) or bench/results.
#
#   bash bench/gpu_mlp_graphs.sh check COMMIT   # GPU tests, 8B-shape exactness, where the GPU idles
#   bash bench/gpu_mlp_graphs.sh bench COMMIT   # tokens/s and peak vs stock and the eager modes
#   bash bench/gpu_mlp_graphs.sh all COMMIT     # both in one call of under 590 s: tests, exactness, then
#                                               # the benchmark in the time left, host gaps last
#   bash bench/gpu_mlp_graphs.sh probe COMMIT   # memory composition: pool trace and peak, next to stock
#   bash bench/gpu_mlp_graphs.sh final COMMIT   # tests, exactness, 2-round benchmark, memory probe: one call
#   bash bench/gpu_mlp_graphs.sh fused COMMIT   # eager and graphed "mlp" QLoRA (fused MLP backward), pool trace, A/B
set -uo pipefail
export PYTHONPATH=$PWD/.devsite:$PWD/src TRITON_INTERPRET=0
out=${OUT:-bench/results}
commit=${2:-unknown}
quiet() { grep -v -e Warning -e "warnings.warn" -e "Loading weights"; }
case "${1:-check}" in
check)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_$commit.txt"
  timeout 240 python -m pytest -q -m gpu tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py \
    tests/train/test_saved_offload.py tests/kernels/test_gpu.py tests/quant/test_quant_offload_checkpointing.py \
    2>&1 | tail -15 | tee "$out/gputests_mlp_graphs_$commit.log"
  timeout 200 python bench/graphs_check.py --impl velotune-qlora --recompute mlp --layers 3 --steps 6 2>&1 \
    | quiet | tee "$out/graphs_check_mlp_$commit.log"
  timeout 180 python bench/host_overhead.py --impls velotune-qlora --recompute mlp --cuda-graphs --no-cprofile \
    --gaps 12 --kernels 12 2>&1 | quiet | tee "$out/host_mlp_graphs_$commit.log"
  ;;
bench)
  python bench/qlora.py --impls stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs velotune-lora-mlp-graphs \
    --offload-embedding --commit "$commit" --json "$out/qlora_mlp_graphs_$commit.json" 2>&1 | quiet \
    | tee "$out/qlora_mlp_graphs_$commit.log"
  ;;
all)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_$commit.txt"
  timeout 170 python -m pytest -q -m gpu tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py \
    tests/train/test_saved_offload.py tests/kernels/test_gpu.py tests/quant/test_quant_offload_checkpointing.py \
    2>&1 | tail -25 | tee "$out/gputests_mlp_graphs_$commit.log"
  timeout 100 python bench/graphs_check.py --impl velotune-qlora --recompute mlp --layers 3 --steps 6 2>&1 \
    | quiet | tee "$out/graphs_check_mlp_$commit.log"
  timeout $((520 - SECONDS)) python bench/qlora.py --impls stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs \
    velotune-lora-mlp-graphs --offload-embedding --commit "$commit" --json "$out/qlora_mlp_graphs_$commit.json" 2>&1 \
    | quiet | tee "$out/qlora_mlp_graphs_$commit.log"
  [ $SECONDS -lt 500 ] && timeout $((585 - SECONDS)) python bench/host_overhead.py --impls velotune-qlora \
    --recompute mlp --cuda-graphs --no-cprofile --gaps 12 --kernels 12 2>&1 | quiet | tee "$out/host_mlp_graphs_$commit.log"
  ;;
fused)   # after the fused MLP backward went on by default: the benchmark, where the graph pool's
         # memory goes, and A/B runs (fused off; a smaller fused-CE chunk), in one call of under 590 s
  timeout 300 python bench/qlora.py --impls stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs --rounds 2 \
    --offload-embedding --commit "$commit" --json "$out/qlora_mlp_fused_$commit.json" 2>&1 \
    | quiet | tee "$out/qlora_mlp_fused_$commit.log"
  timeout 90 python bench/qlora.py --impls velotune-qlora-mlp-graphs --offload-embedding --pool-trace --mem-trace \
    --commit "$commit" --json "$out/qlora_pool_$commit.json" 2>&1 | quiet | tee "$out/qlora_pool_$commit.log"
  for variant in "--unfused-lora-backward" "--ce-budget-mib 64"; do
    [ $SECONDS -lt 520 ] && timeout $((585 - SECONDS)) python bench/qlora.py --impls velotune-qlora-mlp-graphs \
      --offload-embedding $variant --commit "$commit" 2>&1 | quiet | grep -v "^NVIDIA" | sed "s/^/[$variant] /" \
      | tee -a "$out/qlora_variants_$commit.log"
  done
  ;;
probe)   # where the graphed step's memory goes (pool trace, what is alive at the peak), next to stock
  timeout 400 python bench/qlora.py --impls stock-qlora velotune-qlora-mlp-graphs velotune-qlora-mlp \
    --offload-embedding --pool-trace --mem-trace --commit "$commit" --json "$out/qlora_probe_$commit.json" 2>&1 \
    | quiet | tee "$out/qlora_probe_$commit.log"
  ;;
final)   # one call: GPU tests, 8B-shape exactness, the benchmark (2 interleaved rounds), memory probe
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_$commit.txt"
  timeout 120 python -m pytest -q -m gpu tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py \
    tests/train/test_saved_offload.py tests/kernels/test_gpu.py tests/quant/test_quant_offload_checkpointing.py \
    2>&1 | tail -25 | tee "$out/gputests_$commit.log"
  timeout 80 python bench/graphs_check.py --impl velotune-qlora --recompute mlp --layers 3 --steps 6 2>&1 \
    | quiet | tee "$out/graphs_check_mlp_$commit.log"
  timeout $((530 - SECONDS)) python bench/qlora.py --impls stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs \
    velotune-lora-mlp-graphs --rounds 2 --offload-embedding --commit "$commit" \
    --json "$out/qlora_final_$commit.json" 2>&1 | quiet | tee "$out/qlora_final_$commit.log"
  [ $SECONDS -lt 535 ] && timeout $((588 - SECONDS)) python bench/qlora.py --impls velotune-qlora-mlp-graphs \
    --offload-embedding --pool-trace --mem-trace --commit "$commit" 2>&1 | quiet | tee "$out/qlora_probe_$commit.log"
  ;;
*)
  echo "usage: $0 check|bench COMMIT" >&2
  exit 2
  ;;
esac
