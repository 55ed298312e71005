"""TRL SFTTrainer (and DPOTrainer) on variable-length rows: real (non-padding) tokens/s, peak memory, losses.

The workload users run: TRL's own trainer, batch 8, a dataset whose rows have different lengths.
Contenders, each in its own process with its own recommended settings (random-weight models built
from configs with the same seed, so every contender trains the same weights on the same rows):

  stock     transformers + PEFT (bitsandbytes NF4 for qlora), TRL's gradient checkpointing
  unsloth   Unsloth's FastLanguageModel (imported first, in its own process; needs it importable,
            i.e. PYTHONPATH=.devsite from make-devsite.sh --peers). It loads from a folder, so the
            random weights are saved once per shape under --model-dir
  velotune  FastLanguageModel.get_peft_model with the library's defaults (nothing else set)

Length mixes (rows of random words of a word-level tokenizer: one word = one token):
  short  log-normal, median 350 tokens, clipped to [64, 2048]
  long   log-normal, median 350, wider, clipped to [64, 8192] (a long tail)

    python bench/sft.py --out sft.jsonl                                  # 8b, lora+qlora, short mix, 3 contenders
    python bench/sft.py --shapes 1b 8b --modes lora --mixes short long --out sft.jsonl
    python bench/sft.py --dpo --impls stock velotune --out dpo.jsonl     # DPOTrainer, pairs of different lengths
    python bench/sft.py --quick --impls stock velotune                   # CPU smoke test: tiny model, 2 steps

Timing: each micro-batch's real tokens (attention-mask sum, or the row length of a padding-free
[1, N] batch) are counted as the trainer hands it to training_step; tokens/s = real tokens of the
micro-batches after --warmup optimizer steps / wall time from the first of them to the end of the
last step (CUDA synchronised). Unsloth's patched config may use gradient accumulation 2: tokens
are counted per micro-batch, so its figure is comparable. Peak memory: max_memory_allocated over
the whole run (weights included). JSON lines go to --out; a table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("stock", "unsloth", "velotune")
MIXES = {
    "short": dict(median=350, sigma=0.8, lo=64, hi=2048),
    "long": dict(median=350, sigma=1.2, lo=64, hi=8192),
    "quick": dict(median=24, sigma=0.6, lo=8, hi=64),
}  # quick: the CPU smoke test
WORDS = 4000  # word-level vocabulary of the generated tokenizer (ids 0..WORDS+3)
QUICK_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=WORDS + 8,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)


# ------------------------------------------------------------------ data
def lengths(mix: str, n: int, seed: int = 0) -> list[int]:
    """n row lengths from the mix's clipped log-normal."""
    import random

    m = MIXES[mix]
    rng = random.Random(seed)
    return [
        int(min(m["hi"], max(m["lo"], round(rng.lognormvariate(math.log(m["median"]), m["sigma"]))))) for _ in range(n)
    ]


def _words(rng, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))


def sft_dataset(mix: str, n: int, seed: int = 0):
    """A `datasets.Dataset` of n rows of text whose token count follows the mix (EOS added by TRL)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed + 1)
    return Dataset.from_dict({"text": [_words(rng, L - 1) for L in lengths(mix, n, seed)]})


def dpo_dataset(mix: str, n: int, seed: int = 0):
    """n preference rows: a prompt and two completions of different lengths (each about a third of a row)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed + 2)
    ls = lengths(mix, 3 * n, seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        rows["prompt"].append(_words(rng, max(8, ls[3 * i] // 3)))
        rows["chosen"].append(_words(rng, max(4, ls[3 * i + 1] // 3)))
        rows["rejected"].append(_words(rng, max(4, ls[3 * i + 2] // 3)))
    return Dataset.from_dict(rows)


def tokenizer():
    """A word-level tokenizer: "w17" -> one token; <pad>=0, <s>=1, </s>=2, <unk>=3 (bench/common.py's)."""
    return _common().word_tokenizer(WORDS + 4)


# ------------------------------------------------------------------ models
def _common():
    """bench/common.py (imports torch; in Unsloth's worker only after Unsloth itself)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    return common


def model_config(shape: str):
    if shape == "quick":
        from transformers import LlamaConfig

        return LlamaConfig(
            **QUICK_SHAPE, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False
        )
    config = _common().config(shape)
    config.pad_token_id = 0
    return config


def random_model(shape: str, device: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype, attn_implementation="sdpa")


def save_random_model(shape: str, folder: Path, device: str) -> None:
    """The random weights Unsloth loads (the same seed as the others build with), tokenizer included."""
    import torch

    model = random_model(shape, device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)


def build(impl: str, mode: str, shape: str, device: str, model_dir: Path, max_len: int):
    """(model, trainer config overrides) of one contender, its own recommended settings."""
    import torch

    common = _common()
    TARGETS = common.TARGETS
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if impl == "unsloth":
        from unsloth import FastLanguageModel as Unsloth

        model, _ = Unsloth.from_pretrained(
            str(model_dir), max_seq_length=max_len, dtype=dtype, load_in_4bit=mode == "qlora"
        )
        model = Unsloth.get_peft_model(
            model,
            r=16,
            lora_alpha=16,
            target_modules=TARGETS,
            lora_dropout=0.0,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=3407,
        )
        return model, dict(gradient_checkpointing=False)
    model = random_model(shape, device, dtype)
    if mode == "qlora":
        common.quantize_linears_(model, dtype)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if impl == "velotune":
        from velotune import FastLanguageModel
        from velotune.models import prepare_model

        model.velotune_compute_dtype = dtype
        model.max_seq_length = max_len
        prepare_model(model, max_seq_length=max_len)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS), dict(
            gradient_checkpointing=False
        )
    model = common.stock_peft(model, TARGETS, quantized=mode == "qlora")
    return model, dict(gradient_checkpointing=False)  # enabled above, non-reentrant, as PEFT users do


def batch_tokens(inputs) -> int:
    """Token slots of one micro-batch as it reaches the model, padding included."""
    import torch

    return int(sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)))


def real_tokens(inputs):
    """Non-padding tokens of one micro-batch (padded: mask sums; padding-free [1, N]: N; DPO: both halves):
    an int, or a 0-dim tensor on the batch's device (read once the run is over: no sync per step)."""
    import torch

    masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
    if masks:
        return sum(m.sum() for m in masks)
    return int(sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids") and torch.is_tensor(v)))


# ------------------------------------------------------------------ one contender, in its own process
def worker(args) -> dict:
    if args.impl == "unsloth":  # first, before trl / transformers (it patches them on import)
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        import unsloth  # noqa: F401
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    cuda = device == "cuda"
    max_len = MIXES[args.mix]["hi"]
    steps = args.warmup + args.steps
    model, overrides = build(args.impl, args.mode, args.shape, device, Path(args.model_dir), max_len)
    tok = tokenizer()
    common = dict(
        output_dir=str(Path(args.model_dir) / f"run-{args.impl}"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=3407,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        **overrides,
    )
    if args.dpo:
        from trl import DPOConfig, DPOTrainer

        data = dpo_dataset(args.mix, args.batch * steps)
        trainer = DPOTrainer(
            model=model, args=DPOConfig(**common, max_length=None, beta=0.1), train_dataset=data, processing_class=tok
        )
    else:
        from trl import SFTConfig, SFTTrainer

        data = sft_dataset(args.mix, args.batch * steps * 2)  # * 2: room for gradient accumulation 2 (Unsloth)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, max_length=max_len, packing=False),
            train_dataset=data,
            processing_class=tok,
        )
    # Per micro-batch: (optimizer step, real tokens, batch tokens). The GPU is synchronised once, where the
    # timed window starts (the first micro-batch after the warm-up steps), and once at the end: nothing in
    # between waits for it that the trainer itself does not.
    marks: list[tuple[int, object, int]] = []
    start: list[float] = []
    plain_step = trainer.training_step

    def timed_step(model, inputs, *a, **kw):
        step = trainer.state.global_step
        if step >= args.warmup and not start:
            if cuda:
                torch.cuda.synchronize()
            start.append(time.perf_counter())
        marks.append((step, real_tokens(inputs), batch_tokens(inputs)))
        return plain_step(model, inputs, *a, **kw)

    trainer.training_step = timed_step
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        return {"impl": args.impl, "oom": True}
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    timed = [m for m in marks if m[0] >= args.warmup]
    tokens = int(sum(int(m[1]) for m in timed))
    elapsed = end - start[0] if timed else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = {
        "impl": args.impl,
        "mode": args.mode,
        "shape": args.shape,
        "mix": args.mix,
        "dpo": args.dpo,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "oom": False,
        "micro_batches": len(timed),
        "real_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed if timed else None,
        "batch_tokens": sum(m[2] for m in timed),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "losses": losses,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    if args.impl == "velotune":
        from velotune.models import report

        out["report"] = report(model)
        from velotune.models.padding_free import padding_free_stats

        out["padding_free"] = padding_free_stats(model)
        graphs = getattr(model, "velotune_layer_graphs", None)
        if graphs is not None:
            out["layer_graphs"] = dict(graphs.stats)
    return out


def _table(rows: list[dict]) -> str:
    lines = [
        f"{'shape':<6}{'mode':<7}{'mix':<7}{'task':<5}{'impl':<10}{'real tok/s':>12}{'peak GiB':>10}"
        f"{'first loss':>12}{'last loss':>11}  vs stock  vs unsloth"
    ]
    base: dict = {}
    for r in rows:
        if r.get("tokens_per_s"):
            base[(r["shape"], r["mode"], r["mix"], r["dpo"], r["impl"])] = r["tokens_per_s"]
    for r in rows:
        key = (r.get("shape"), r.get("mode"), r.get("mix"), r.get("dpo"))
        tps = r.get("tokens_per_s")
        if not tps:
            status = "OOM" if r.get("oom") else "timeout" if r.get("timeout") else "failed"
            lines.append(
                f"{key[0]!s:<6}{key[1]!s:<7}{key[2]!s:<7}{'dpo' if key[3] else 'sft':<5}"
                f"{r.get('impl')!s:<10}{status:>12}"
            )
            continue
        ratios = [f"{tps / base[(*key, o)]:.2f}x" if base.get((*key, o)) else "-" for o in ("stock", "unsloth")]
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        fl = f"{r['first_loss']:.4f}" if r.get("first_loss") is not None else "-"
        ll = f"{r['last_loss']:.4f}" if r.get("last_loss") is not None else "-"
        lines.append(
            f"{key[0]:<6}{key[1]:<7}{key[2]:<7}{'dpo' if key[3] else 'sft':<5}{r['impl']:<10}"
            f"{tps:>12,.0f}{peak:>10}{fl:>12}{ll:>11}  {ratios[0]:>8}  {ratios[1]:>9}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["8b"], choices=["8b", "1b", "quick"])
    p.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--mixes", nargs="+", default=["short"], choices=["short", "long"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dpo", action="store_true", help="TRL DPOTrainer on preference pairs instead of SFTTrainer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps before timing")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny model, 2 steps, short mix")
    p.add_argument("--out", help="append one JSON line per contender here (e.g. bench/results/sft.jsonl)")
    p.add_argument("--commit", default=None, help="recorded with each row (default: GIT_COMMIT or HEAD)")
    p.add_argument("--model-dir", default="/tmp/velotune-sft-bench", help="where Unsloth's random weights are saved")
    p.add_argument("--timeout", type=float, default=1800)
    # internal: one contender / saving the random weights
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--mix", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.shapes, args.mixes, args.steps, args.warmup, args.batch = ["quick"], ["quick"], 2, 1, 2
        args.modes = [m for m in args.modes if m == "lora"] or ["lora"]
    if args.save:
        import torch

        save_random_model(
            args.shape, Path(args.model_dir), "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
        )
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    args.commit = args.commit or _common().default_commit()
    rows = []
    for shape in args.shapes:
        folder = Path(args.model_dir) / shape
        if "unsloth" in args.impls and not (folder / "config.json").exists():
            print(f"saving random {shape} weights to {folder} for Unsloth", flush=True)
            subprocess.run(
                [sys.executable, __file__, "--save", "--shape", shape, "--model-dir", str(folder)]
                + (["--quick"] if args.quick else []),
                check=True,
            )
        for mode in args.modes:
            for mix in args.mixes:
                for impl in args.impls:
                    argv = (
                        [
                            "--worker",
                            "--impl",
                            impl,
                            "--shape",
                            shape,
                            "--mode",
                            mode,
                            "--mix",
                            mix,
                            "--batch",
                            str(args.batch),
                            "--steps",
                            str(args.steps),
                            "--warmup",
                            str(args.warmup),
                            "--model-dir",
                            str(folder),
                        ]
                        + (["--dpo"] if args.dpo else [])
                        + (["--quick"] if args.quick else [])
                    )
                    r = _common().run_worker(__file__, argv, args.timeout) or {}
                    r = {"impl": impl, "shape": shape, "mode": mode, "mix": mix, "dpo": args.dpo, **r}
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "report")}), flush=True)
                    _common().write_rows(
                        Path(args.out) if args.out else None,
                        "dpo" if args.dpo else "sft",
                        [r],
                        args.commit,
                        device="cpu" if args.quick else "cuda",
                    )
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
