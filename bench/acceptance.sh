#!/usr/bin/env bash
# The GPU checks of the open issues' "Done when", one device call (< 10 minutes) per mode, each run with
# its baseline in the same call. Needs .devsite (../shared/device/make-devsite.sh --peers; carry [".devsite"]).
# Logs and JSON lines go to $OUT (default /tmp/velotune-bench); copy the rows the docs cite into
# bench/results/<subject>.jsonl (with a "source" field) and the table into BENCHMARKS.md.
#
#   bash bench/acceptance.sh tests    # every @pytest.mark.gpu test (the varlen attention A/B that chose flash varlen:
#                                     #     python bench/varlen_attention.py --mix short long --window 256)
#   bash bench/acceptance.sh sft8     # 22: TRL SFTTrainer, variable lengths, 8B bf16 LoRA + QLoRA: velotune, Unsloth;
#                                     #     then velotune's own fixed 2 x 2048 (library defaults) for the >= 0.9x check
#   bash bench/acceptance.sh sft1     # 22: the 1B shape, stock, Unsloth and velotune
#   bash bench/acceptance.sh dpo      # 22: DPOTrainer on pairs of different lengths, velotune vs stock
#   bash bench/acceptance.sh ab       # 23: fixed-shape 8B QLoRA/LoRA, this tree vs e659ab6 (interleaved rounds)
#   bash bench/acceptance.sh families # 24: qwen3-8b, gemma3-4b, gemma3-12b: bf16 LoRA + QLoRA vs stock
#   bash bench/acceptance.sh generic  # 24: the generic path (pythia-6.9b, aya-8b) vs stock
#   bash bench/acceptance.sh grpo     # 28: one GRPO step (generation + update), 1B and 8B, vs stock TRL + PEFT
# (Issue 25's 70B / 27B / 12B checks are bench/big_models.sh's modes.)
set -uo pipefail
export PYTHONPATH=$PWD/.devsite:$PWD/src TRITON_INTERPRET=0 UNSLOTH_DISABLE_STATISTICS=1
mode=${1:?mode}
commit=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
out=${OUT:-/tmp/velotune-bench}
mkdir -p "$out"
exec > >(tee -a "$out/acceptance_${mode}_${commit}.log") 2>&1
echo "== $mode at $commit, $(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"
jsonl() { echo "$out/$1.jsonl"; }

case "$mode" in
  tests)
    timeout 420 python -m pytest -q -m gpu tests/ -p no:cacheprovider -rfE
    ;;
  sft8)
    timeout 430 python bench/sft.py --shapes 8b --modes lora qlora --impls velotune unsloth --warmup 8 --steps 16 \
      --commit "$commit" --out "$(jsonl sft)"
    timeout 130 python bench/qlora.py --impls velotune-lora velotune-qlora --rounds 1 --commit "$commit" --jsonl "$(jsonl qlora)"
    ;;
  sft1)
    timeout 330 python bench/sft.py --shapes 1b --modes lora --impls stock unsloth velotune --warmup 8 --steps 16 \
      --commit "$commit" --out "$(jsonl sft)"
    ;;
  dpo)
    timeout 560 python bench/sft.py --dpo --shapes 8b --modes lora --impls stock velotune --warmup 4 --steps 12 \
      --commit "$commit" --out "$(jsonl sft)"
    ;;
  ab)
    rm -rf ab/base && mkdir -p ab/base && git archive e659ab6 src | tar -x -C ab/base --exclude='src/velotune/demo/assets'
    # the same explicit settings on both trees (the defaults changed in between; e659ab6 lacks offload_every)
    timeout 560 python bench/qlora.py --impls velotune-qlora velotune-qlora@base velotune-lora velotune-lora@base \
      --recompute mlp --offload-embedding --rounds 2 --base-src ab/base/src --commit "$commit" --jsonl "$(jsonl qlora)"
    ;;
  families)
    for shape in qwen3-8b gemma3-4b gemma3-12b; do
      timeout 180 python bench/qlora.py --shape "$shape" --impls stock-lora velotune-lora stock-qlora velotune-qlora \
        --steps 4 --warmup 2 --commit "$commit" --jsonl "$(jsonl families)"
    done
    ;;
  generic)
    for shape in pythia-6.9b aya-8b; do
      timeout 270 python bench/qlora.py --shape "$shape" --impls stock-lora velotune-lora --steps 4 --warmup 2 \
        --commit "$commit" --jsonl "$(jsonl generic)"
    done
    ;;
  grpo)
    timeout 560 python bench/grpo.py --shapes 1b 8b --impls stock-lora velotune-lora --commit "$commit" --jsonl "$(jsonl grpo)"
    ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
echo "== done $(date -u +%FT%TZ)"
