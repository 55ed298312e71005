#!/usr/bin/env bash
# Big models on one card (issue 25): test checkpoints written on the GPU machine, bounded-memory loading,
# 70B QLoRA throughput vs stock, 70B max context. Each mode fits one device call of under 10 minutes
# (the machine must stay warm between calls: the checkpoints live in $CK on its disk, 64 GB).
# Needs .devsite (../shared/device/make-devsite.sh; carry [".devsite"]) for bitsandbytes. Logs, JSON and the
# JSON-lines rows (bench/common.py's format, for bench/results/*.jsonl) go to $OUT (default /tmp/velotune-bench).
#
#   bash bench/big_models.sh load12 COMMIT   # 12B (Mistral Nemo) bf16 checkpoint (~23 GiB); loaded with
#                                            # load_in_4bit=True under a 16 GiB cap: host and GPU peaks vs
#                                            # the bounds; the 16-bit load refused before loading; deleted after
#   bash bench/big_models.sh ckpt70 COMMIT   # 70B pre-quantised NF4 checkpoint (~37 GiB); its load peaks
#   bash bench/big_models.sh tp70 COMMIT     # 70B QLoRA 2 x 2048 and 1 x 8192: velotune vs stock (OOM recorded)
#   bash bench/big_models.sh ctx70 COMMIT    # 70B max context at a 78 GiB cap, offload_every auto, bound per probe
#   bash bench/big_models.sh mid COMMIT      # 27B (Gemma 2) and 12B (Mistral Nemo), 2 x 2048: QLoRA and bf16 LoRA,
#                                            # velotune vs stock (models made on the GPU, no checkpoint)
#   bash bench/big_models.sh gpu COMMIT      # the GPU tests of issue 25's files
set -uo pipefail
export PYTHONPATH=$PWD/.devsite:$PWD/src TRITON_INTERPRET=0
mode=${1:?mode}
commit=${2:-?}
out=${OUT:-/tmp/velotune-bench}
CK=${CK:-/tmp/velotune-ckpt}
mkdir -p "$out" "$CK"
log="$out/big_${mode}_${commit}.log"
exec > >(tee -a "$log") 2>&1
echo "== $mode at $commit, $(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
df -h "$CK" | tail -1; free -g | head -2

case "$mode" in
  load12)
    timeout 200 python bench/make_checkpoint.py --shape 12b --format bf16 --out "$CK/12b-bf16" --shard-gib 4.6
    timeout 150 python bench/load_memory.py "$CK/12b-bf16" --load-in-4bit --device cuda --cap-gib 16 \
      --json "$out/big_load12_4bit_${commit}.json"
    timeout 60 python - "$CK/12b-bf16" <<'EOF'
import sys, torch
from velotune import FastLanguageModel
from velotune.errors import ModelLoadError
try:
    FastLanguageModel.from_pretrained(sys.argv[1], dtype=torch.bfloat16, memory_cap="16GiB")
    print("16-bit load under 16 GiB: NOT refused")
except ModelLoadError as e:
    print(f"16-bit load under 16 GiB refused before loading ({torch.cuda.memory_allocated()} bytes on the GPU): {e}")
EOF
    rm -rf "$CK/12b-bf16"
    ;;
  ckpt70)
    timeout 420 python bench/make_checkpoint.py --shape 70b --out "$CK/70b-bnb-4bit" --shard-gib 4
    timeout 150 python bench/load_memory.py "$CK/70b-bnb-4bit" --load-in-4bit --device cuda \
      --json "$out/big_load70_${commit}.json"
    ;;
  tp70)
    for shape in "2 2048" "1 8192"; do
      set -- $shape
      timeout 280 python bench/qlora.py --checkpoint "$CK/70b-bnb-4bit" --shape 70b --impls velotune-qlora stock-qlora \
        --batch "$1" --seq "$2" --steps 4 --warmup 2 --commit "$commit" --jsonl "$out/qlora.jsonl"
    done
    ;;
  ctx70)
    timeout 590 python bench/context.py --checkpoint "$CK/70b-bnb-4bit" --shape 70b --impls velotune-qlora \
      --card-gib 78 --offload-every auto --offload-embedding --probes 8192 16384 32768 --time-box 560 \
      --commit "$commit" --jsonl "$out/context.jsonl"
    ;;
  mid)
    for shape in 12b 27b; do
      timeout 290 python bench/qlora.py --shape "$shape" --impls stock-qlora velotune-qlora stock-lora velotune-lora \
        --steps 4 --warmup 2 --commit "$commit" --jsonl "$out/qlora.jsonl"
    done
    ;;
  gpu)
    timeout 300 python -m pytest -q -m gpu tests/memory/test_sparse_offload.py \
      tests/quant/test_quant_offload_checkpointing.py
    ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
echo "== done $(date -u +%FT%TZ)"
