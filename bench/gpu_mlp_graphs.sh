#!/usr/bin/env bash
# GPU checks and benchmarks of cuda_graphs=True with recompute="mlp" (memory/saved_graphs.py), each mode
# one device call of under 10 minutes (docs/perf-notes.md says what to look for). Logs go to $OUT (the
# device tool's output folder) or bench/results.
#
#   bash bench/gpu_mlp_graphs.sh check COMMIT   # GPU tests, 8B-shape exactness, where the GPU idles
#   bash bench/gpu_mlp_graphs.sh bench COMMIT   # tokens/s and peak vs stock and the eager modes
#   bash bench/gpu_mlp_graphs.sh all COMMIT     # both: tests, exactness, the benchmark in the time left,
#                                               # host gaps last
#   bash bench/gpu_mlp_graphs.sh final COMMIT   # tests, exactness, 2-round benchmark, memory probe
#   bash bench/gpu_mlp_graphs.sh probe COMMIT   # memory composition: pool trace and peak, next to stock
#   bash bench/gpu_mlp_graphs.sh fused COMMIT   # 2-round benchmark, pool trace, A/B (fused MLP kernels
#                                               # off; a smaller fused-CE chunk)
#   bash bench/gpu_mlp_graphs.sh chunks COMMIT  # the MLP backward in 1, 2, 4 row blocks (mlp_row_blocks):
#                                               # its GPU tests, eager and graphed "mlp" vs stock, and the
#                                               # cuDNN eager-vs-eager control (graphs_check.py --control)
#   bash bench/gpu_mlp_graphs.sh blocks COMMIT  # the MLP in 4 and 8 row blocks, forward and backward:
#                                               # GPU tests, graphed vs stock with the pool, eager 4 blocks
#   bash bench/gpu_mlp_graphs.sh rows COMMIT    # graphed, mlp_row_blocks=4 vs stock and vs 1 block; bf16
#                                               # LoRA graphed with 4 blocks (the QLoRA / LoRA ratio)
#   bash bench/gpu_mlp_graphs.sh rounds COMMIT  # 2 rounds: stock and graphed "mlp" (1 row block); 4 blocks
#   (the `prefetch` mode, at 806c8b2, timed the dequantisation prefetch since removed: it lost 2%)
#   (the `words` mode, at d326a9b, timed a one-pass GLU + project and a "words" dequantisation layout,
#   both slower and removed)
#   bash bench/gpu_mlp_graphs.sh trace COMMIT   # idle gaps of the graphed "mlp" step, each with every device
#                                               # event (kernels, copies, all streams) around it
#   bash bench/gpu_mlp_graphs.sh verify COMMIT  # GPU tests of the session's files; stock vs graphed "mlp" with
#                                               # OffloadedAdamW, 2 rounds
#   bash bench/gpu_mlp_graphs.sh inback COMMIT  # GPU tests; stock vs graphed "mlp" with OffloadedAdamW updating in
#                                               # backward (2 rounds); the update after backward, same call
#   bash bench/gpu_mlp_graphs.sh chain13 COMMIT # session 13: chained graph buffers, fp32 adapter-gradient GEMMs,
#                                               # one-cat casts: GPU tests, vs stock
#   bash bench/gpu_mlp_graphs.sh final13 COMMIT # session 13 final: GPU tests, vs stock, and with the workspace off
#   bash bench/gpu_mlp_graphs.sh confirm13 COMMIT # stock, QLoRA, bf16 LoRA: 2 interleaved rounds
#   bash bench/gpu_mlp_graphs.sh gather COMMIT  # the embedding rows gathered by the GPU from the pinned table
#                                               # (no host sync per step) with OffloadedAdamW: GPU tests,
#                                               # stock vs graphed "mlp" (2 rounds), the host gather, idle
set -uo pipefail
export PYTHONPATH=$PWD/.devsite:$PWD/src TRITON_INTERPRET=0
out=${OUT:-bench/results}
commit=${2:-unknown}
quiet() { grep -v -e Warning -e "warnings.warn" -e "Loading weights"; }
card() { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_$commit.txt"; }
gpu_tests() {   # SECONDS LOG
  timeout "$1" python -m pytest -q -m gpu tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py \
    tests/train/test_saved_offload.py tests/kernels/test_gpu.py tests/quant/test_quant_offload_checkpointing.py \
    2>&1 | tail -25 | tee "$out/$2_$commit.log"
}
exactness() {   # SECONDS: graphed vs eager "mlp" at the 8B layer shape, 3 layers, default and math SDPA
  timeout "$1" python bench/graphs_check.py --impl velotune-qlora --recompute mlp --layers 3 --steps 6 2>&1 \
    | quiet | tee "$out/graphs_check_mlp_$commit.log"
}
host_gaps() {   # SECONDS
  timeout "$1" python bench/host_overhead.py --impls velotune-qlora --recompute mlp --cuda-graphs --no-cprofile \
    --gaps 12 --kernels 12 2>&1 | quiet | tee "$out/host_mlp_graphs_$commit.log"
}
qlora() {       # SECONDS NAME ARGS...: bench/qlora.py, 8B QLoRA 2 x 2048, embeddings in host memory
  local t=$1 name=$2
  shift 2
  timeout "$t" python bench/qlora.py --offload-embedding --commit "$commit" "$@" 2>&1 | quiet \
    | tee "$out/qlora_${name}_$commit.log"
}
contenders=(stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs velotune-lora-mlp-graphs)
case "${1:-check}" in
check)
  card
  gpu_tests 240 gputests_mlp_graphs
  exactness 200
  host_gaps 180
  ;;
bench)
  qlora 590 mlp_graphs --impls "${contenders[@]}" --json "$out/qlora_mlp_graphs_$commit.json"
  ;;
all)
  card
  gpu_tests 170 gputests_mlp_graphs
  exactness 100
  qlora $((520 - SECONDS)) mlp_graphs --impls "${contenders[@]}" --json "$out/qlora_mlp_graphs_$commit.json"
  [ $SECONDS -lt 500 ] && host_gaps $((585 - SECONDS))
  ;;
final)
  card
  gpu_tests 120 gputests
  exactness 80
  qlora $((530 - SECONDS)) final --impls "${contenders[@]}" --rounds 2 --json "$out/qlora_final_$commit.json"
  [ $SECONDS -lt 535 ] && qlora $((588 - SECONDS)) probe --impls velotune-qlora-mlp-graphs --pool-trace --mem-trace
  ;;
probe)
  qlora 400 probe --impls stock-qlora velotune-qlora-mlp-graphs velotune-qlora-mlp --pool-trace --mem-trace \
    --json "$out/qlora_probe_$commit.json"
  ;;
fused)
  qlora 300 mlp_fused --impls "${contenders[@]:0:3}" --rounds 2 --json "$out/qlora_mlp_fused_$commit.json"
  qlora 90 pool --impls velotune-qlora-mlp-graphs --pool-trace --mem-trace --json "$out/qlora_pool_$commit.json"
  for variant in "--unfused-lora-backward" "--ce-budget-mib 64"; do
    # shellcheck disable=SC2086  # the variant is two words where it has a value
    [ $SECONDS -lt 520 ] && qlora $((585 - SECONDS)) "variant_${variant//[^a-z0-9]/}" \
      --impls velotune-qlora-mlp-graphs $variant
  done
  ;;
chunks)
  card
  timeout 120 python -m pytest -q -m gpu tests/lora/test_recomputed_mlp.py tests/train/test_saved_graphs.py \
    tests/train/test_saved_offload.py 2>&1 | tail -25 | tee "$out/gputests_chunks_$commit.log"
  qlora 200 chunks1 --impls stock-qlora velotune-qlora-mlp velotune-qlora-mlp-graphs --pool-trace
  qlora 60 checkpointed --impls velotune-qlora-mlp --checkpointed-mlp   # the MLP path before, same call
  timeout 90 python bench/graphs_check.py --impl velotune-qlora --recompute mlp --layers 3 --steps 6 \
    --backends default --control 2>&1 | quiet | tee "$out/graphs_control_$commit.log"
  for n in 2 4; do
    [ $SECONDS -lt 500 ] && qlora $((585 - SECONDS)) "chunks$n" --impls velotune-qlora-mlp velotune-qlora-mlp-graphs \
      --mlp-chunks $n --pool-trace
  done
  ;;
blocks)   # after the forward too went into row blocks (and a block's tensors go before the next's)
  card
  timeout 150 python -m pytest -q -m gpu tests/lora/test_recomputed_mlp.py tests/kernels/test_gpu.py \
    tests/train/test_saved_graphs.py 2>&1 | tail -25 | tee "$out/gputests_blocks_$commit.log"
  qlora 200 blocks4 --impls stock-qlora velotune-qlora-mlp-graphs --mlp-chunks 4 --pool-trace
  qlora 80 blocks8 --impls velotune-qlora-mlp-graphs --mlp-chunks 8 --pool-trace
  [ $SECONDS -lt 500 ] && qlora $((585 - SECONDS)) eager4 --impls velotune-qlora-mlp --mlp-chunks 4
  ;;
rows)     # get_peft_model(mlp_row_blocks=4) after the graph lets Wg / Wu go before Wd: vs stock, vs 1 block
  card
  timeout 120 python -m pytest -q -m gpu tests/lora/test_recomputed_mlp.py tests/train/test_saved_graphs.py \
    2>&1 | tail -25 | tee "$out/gputests_rows_$commit.log"
  qlora 200 rows4 --impls stock-qlora velotune-qlora-mlp-graphs --mlp-chunks 4 --pool-trace \
    --json "$out/qlora_rows4_$commit.json"
  qlora 90 rows1 --impls velotune-qlora-mlp-graphs --json "$out/qlora_rows1_$commit.json"
  [ $SECONDS -lt 480 ] && qlora $((585 - SECONDS)) lora_rows4 --impls velotune-lora-mlp-graphs --mlp-chunks 4 \
    --json "$out/qlora_lora_rows4_$commit.json"
  ;;
rounds)   # 2 interleaved rounds: stock and graphed "mlp" with 1 row block, then graphed with 4 row blocks
  card
  qlora 300 rounds1 --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --json "$out/qlora_rounds1_$commit.json"
  [ $SECONDS -lt 400 ] && qlora $((530 - SECONDS)) rounds4 --impls velotune-qlora-mlp-graphs --mlp-chunks 4 \
    --rounds 2 --json "$out/qlora_rounds4_$commit.json"
  ;;
gather)   # embedding_offload.GATHER_ON_GPU and OffloadedAdamW's copies out overlapping the next step
  card
  timeout 120 python -m pytest -q -m gpu tests/train/test_embedding_offload.py tests/train/test_offload_adamw.py \
    tests/train/test_saved_graphs.py 2>&1 | tail -25 | tee "$out/gputests_gather_$commit.log"
  qlora 280 gather --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --json "$out/qlora_gather_$commit.json"
  qlora 90 host_gather --impls velotune-qlora-mlp-graphs --offload-optimizer --host-gather-embedding \
    --json "$out/qlora_host_gather_$commit.json"
  [ $SECONDS -lt 480 ] && timeout $((585 - SECONDS)) python bench/host_overhead.py --impls velotune-qlora \
    --recompute mlp --cuda-graphs --offload-embedding --offload-optimizer --no-cprofile --gaps 14 --kernels 14 \
    2>&1 | quiet | tee "$out/host_gather_gaps_$commit.log"
  ;;
trace)    # what the graphed forward waits for: the link's bandwidth; 3 saved sets vs 2 (is the forward bound
          # by the sets' copies to host memory?); idle gaps with every device event around them, and
          # all events of two profiled steps (trace_COMMIT.jsonl.gz) to read off the machine
  card
  timeout 60 python bench/copy_bandwidth.py 2>&1 | tee "$out/copy_bandwidth_$commit.log"
  for sets in 3 2; do
    qlora 130 "sets$sets" --impls velotune-qlora-mlp-graphs --offload-optimizer --saved-sets $sets
  done
  timeout $((590 - SECONDS)) python bench/host_overhead.py --impls velotune-qlora --recompute mlp --cuda-graphs \
    --offload-embedding --offload-optimizer --no-cprofile --gaps 14 --timeline 8 --dump "$out/trace_$commit.jsonl.gz" \
    2>&1 | quiet | tee "$out/host_trace_$commit.log"
  ;;
verify)   # the GPU tests of every file the session touched, then stock vs graphed "mlp" + OffloadedAdamW
  card
  timeout 200 python -m pytest -q -m gpu tests/kernels/test_gpu.py tests/quant tests/lora/test_recomputed_mlp.py \
    tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py tests/train/test_embedding_offload.py \
    tests/train/test_offload_adamw.py 2>&1 | tail -25 | tee "$out/gputests_verify_$commit.log"
  qlora $((590 - SECONDS)) verify --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --json "$out/qlora_verify_$commit.json"
  ;;
inback)   # session 12: OffloadedAdamW(update_in_backward=True), one gradient copy per layer, host position ids
  card
  timeout 150 python -m pytest -q -m gpu tests/train/test_offload_adamw.py tests/train/test_saved_graphs.py \
    tests/train/test_layer_graphs.py tests/train/test_embedding_offload.py 2>&1 | tail -25 \
    | tee "$out/gputests_inback_$commit.log"
  qlora $((520 - SECONDS)) inback --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --optimizer-in-backward --json "$out/qlora_inback_$commit.json"
  [ $SECONDS -lt 510 ] && qlora $((590 - SECONDS)) after --impls velotune-qlora-mlp-graphs --offload-optimizer \
    --json "$out/qlora_after_$commit.json"
  ;;
memsets)  # the memsets in front of cuBLAS GEMMs in the graphs: which cuBLAS setting makes them, at what GEMM speed
  card
  for v in "" "CUBLAS_WORKSPACE_CONFIG=:0:0" "CUBLASLT_WORKSPACE_SIZE=0" "CUBLAS_WORKSPACE_CONFIG=:4096:8"; do
    env $v timeout 60 python bench/gemm_memsets.py 2>&1 | tee -a "$out/gemm_memsets_$commit.log"
  done
  timeout 60 python bench/gemm_memsets.py lt 2>&1 | tee -a "$out/gemm_memsets_$commit.log"
  ;;
noworkspace)   # CUBLAS_WORKSPACE_CONFIG=:0:0 for both contenders (2 rounds), and the default, same call
  card
  qlora 330 ws0 --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer --optimizer-in-backward \
    --cublas-workspace :0:0 --json "$out/qlora_ws0_$commit.json"
  qlora $((585 - SECONDS)) wsdefault --impls velotune-qlora-mlp-graphs stock-qlora --offload-optimizer \
    --optimizer-in-backward --json "$out/qlora_wsdefault_$commit.json"
  ;;
final12)  # session 12's final code: GPU tests; stock vs update-in-backward (2 rounds); velotune with the cuBLAS
          # workspace off (stock is slower with it: its best is the default, above)
  card
  timeout 120 python -m pytest -q -m gpu tests/train/test_offload_adamw.py tests/train/test_saved_graphs.py \
    tests/train/test_layer_graphs.py 2>&1 | tail -25 | tee "$out/gputests_final12_$commit.log"
  qlora $((500 - SECONDS)) final12 --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --optimizer-in-backward --json "$out/qlora_final12_$commit.json"
  [ $SECONDS -lt 520 ] && qlora $((590 - SECONDS)) final12_ws0 --impls velotune-qlora-mlp-graphs --offload-optimizer \
    --optimizer-in-backward --cublas-workspace :0:0 --json "$out/qlora_final12_ws0_$commit.json"
  ;;
chain13)  # session 13 (e182954): graphed layers chained through two buffers, adapter gradients written fp32
          # by cuBLAS, group casts / gradient stores by one cat, small saved spans copied together: cast
          # timings; GPU tests; stock vs velotune (2 rounds). (At e182954 it also ran a scoped cuBLAS
          # workspace setting, since removed: torch 2.11 has no API for it, the run was its no-op control.)
  card
  timeout 60 python bench/group_casts.py 2>&1 | tee "$out/group_casts_$commit.log"
  timeout 150 python -m pytest -q -m gpu tests/train/test_saved_graphs.py tests/train/test_layer_graphs.py \
    tests/kernels/test_gpu.py tests/lora 2>&1 | tail -25 | tee "$out/gputests_chain13_$commit.log"
  qlora $((500 - SECONDS)) chain13 --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --optimizer-in-backward --json "$out/qlora_chain13_$commit.json"
  ;;
final13)  # session 13's final code (GLU kernels tuned by bench/glu_tune.py): GPU tests; stock vs velotune
          # (2 rounds); velotune with CUBLAS_WORKSPACE_CONFIG=:0:0 (no cuBLAS memsets; stock is slower with it)
  card
  timeout 150 python -m pytest -q -m gpu tests/kernels/test_gpu.py tests/train/test_saved_graphs.py \
    tests/train/test_layer_graphs.py tests/lora 2>&1 | tail -25 | tee "$out/gputests_final13_$commit.log"
  qlora $((480 - SECONDS)) final13 --impls stock-qlora velotune-qlora-mlp-graphs --rounds 2 --offload-optimizer \
    --optimizer-in-backward --json "$out/qlora_final13_$commit.json"
  [ $SECONDS -lt 510 ] && qlora $((590 - SECONDS)) final13_ws0 --impls velotune-qlora-mlp-graphs --offload-optimizer \
    --optimizer-in-backward --cublas-workspace :0:0 --json "$out/qlora_final13_ws0_$commit.json"
  ;;
trace13)  # where the chained step's time goes: GEMM variants of the adapter gradients, two profiled steps
          # dumped (trace_COMMIT.jsonl.gz, read with bench/trace_gaps.py), and the step with no cuBLAS
          # workspace for the whole process (torch 2.11 has no API to scope it)
  card
  timeout 60 python bench/group_casts.py 2>&1 | tee "$out/group_casts_$commit.log"
  timeout 240 python bench/host_overhead.py --impls velotune-qlora --recompute mlp --cuda-graphs \
    --offload-embedding --offload-optimizer --optimizer-in-backward --no-cprofile --gaps 14 \
    --dump "$out/trace_$commit.jsonl.gz" 2>&1 | quiet | tee "$out/host_trace_$commit.log"
  [ $SECONDS -lt 480 ] && qlora $((590 - SECONDS)) ws0 --impls velotune-qlora-mlp-graphs --offload-optimizer \
    --optimizer-in-backward --cublas-workspace :0:0 --json "$out/qlora_ws0_$commit.json"
  ;;
confirm13)  # a second call at session 13's final code: stock, QLoRA and bf16 LoRA (both graphed "mlp", same
            # settings), 2 interleaved rounds: the 4.5x / 0.38x target again, and QLoRA / bf16 LoRA
  card
  qlora 590 confirm13 --impls stock-qlora velotune-qlora-mlp-graphs velotune-lora-mlp-graphs --rounds 2 \
    --offload-optimizer --optimizer-in-backward --json "$out/qlora_confirm13_$commit.json"
  ;;
*)
  echo "usage: $0 check|bench|all|final|probe|fused|chunks|blocks|rows|rounds|gather|trace|verify|inback|memsets|noworkspace|final12 COMMIT" >&2
  exit 2
  ;;
esac
