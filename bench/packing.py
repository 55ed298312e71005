"""Packed (padding-free) vs padded training throughput on a realistic, long-tailed length mix.

    python bench/packing.py                 # GPU: Llama-3.2-1B shape, random weights, bf16, LoRA r=16 (< 2 min)
    python bench/packing.py --cpu-smoke     # CPU: tiny config, checks the whole code path in seconds

Every mode runs forward + backward over the SAME pool of samples (lengths drawn from a log-normal,
median ~350 tokens, clipped to [32, 2048] -- the shape of chat SFT sets) with the same weights, so
the summed loss over the pool must agree across modes (a built-in correctness check; bf16 noise only).
Modes (all at most --tokens-per-step tokens per step, pads included):
  padded          batches of --batch samples in data order, right-padded to the longest (HF default)
  padded-grouped  the same after sorting by length (HF group_by_length-like: least padding)
  packed-rows     best-fit packed rows of --row-len tokens, [R, row-len] per step (PaddingFreeCollator keep_rows)
  packed-flat     the same rows concatenated into [1, R*row-len] (PaddingFreeCollator default)
Reported: real (non-pad) tokens/s and speed-up vs padded. Paste the markdown table into BENCHMARKS.md
with the card, date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts src/ on sys.path)
import torch  # noqa: E402

from velotune.data.packing import PaddingFreeCollator, pack_indices  # noqa: E402

LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, float32 (tests the code path)")
    p.add_argument("--samples", type=int, default=512, help="pool size (every mode runs the whole pool)")
    p.add_argument("--batch", type=int, default=8, help="samples per padded batch")
    p.add_argument("--max-len", type=int, default=2048, help="longest sample (the log-normal is clipped here)")
    p.add_argument("--median-len", type=float, default=350.0)
    p.add_argument("--sigma", type=float, default=0.9, help="log-normal sigma (tail weight)")
    p.add_argument("--row-len", type=int, default=4096, help="packed row capacity")
    p.add_argument("--tokens-per-step", type=int, default=12288, help="budget per step, pads included")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per mode (not timed)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=100.0,
        help="skip the remaining modes once this much time has passed since the start",
    )
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA r=16")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flex_attention, ...)")
    p.add_argument("--velotune", action="store_true", help="apply velotune's fast path (models.prepare_model)")
    p.add_argument("--modes", default="padded,padded-grouped,packed-rows,packed-flat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.samples, args.batch, args.max_len, args.median_len = min(args.samples, 24), 4, 64, 12.0
        args.row_len, args.tokens_per_step, args.warmup = 128, 256, 1
    if args.max_len > args.row_len:
        p.error(f"--max-len {args.max_len} must fit in --row-len {args.row_len}")
    if args.tokens_per_step < args.max_len:
        p.error(f"--tokens-per-step {args.tokens_per_step} must hold one --max-len {args.max_len} sample")
    return args


def draw_lengths(n: int, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [max(lo, min(hi, int(round(rng.lognormvariate(math.log(median), sigma))))) for _ in range(n)]


def make_pool(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pool = []
    for n in lengths:
        ids = torch.randint(10, vocab, (n,), generator=g).tolist()
        labels = list(ids)
        cut = n // 4  # a masked prompt: the first quarter of each sample
        labels[:cut] = [-100] * cut
        pool.append({"input_ids": ids, "labels": labels})
    return pool


def padded_batch(samples: list[dict]) -> dict:
    T = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    labels = torch.full((len(samples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def build_batches(mode: str, pool: list[dict], args) -> list[dict]:
    """The pool as a list of model inputs for one mode (every sample exactly once)."""
    if mode in ("padded", "padded-grouped"):
        order = list(range(len(pool)))
        if mode == "padded-grouped":
            order.sort(key=lambda i: len(pool[i]["input_ids"]))
        batches, cur = [], []
        for i in order:  # up to --batch samples while the padded size stays within budget
            nxt = cur + [i]
            width = max(len(pool[j]["input_ids"]) for j in nxt)
            if cur and (len(nxt) > args.batch or width * len(nxt) > args.tokens_per_step):
                batches.append(cur)
                nxt = [i]
            cur = nxt
        batches.append(cur)
        return [padded_batch([pool[i] for i in b]) for b in batches]
    rows = pack_indices([len(s["input_ids"]) for s in pool], args.row_len)
    rows = [[pool[i] for i in sorted(r)] for r in rows]
    features = [
        {
            "input_ids": [t for s in r for t in s["input_ids"]],
            "labels": [t for s in r for t in s["labels"]],
            "seq_lengths": [len(s["input_ids"]) for s in r],
        }
        for r in rows
    ]
    per_step = max(1, args.tokens_per_step // args.row_len)
    collate = PaddingFreeCollator(keep_rows=(mode == "packed-rows"))
    return [collate(features[k : k + per_step]) for k in range(0, len(features), per_step)]


def build_model(args, device, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(TINY if args.cpu_smoke else LLAMA_32_1B))
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn)
    model.config.use_cache = False
    if args.velotune:
        from velotune.models import prepare_model

        prepare_model(model, max_seq_length=args.max_len, full_finetuning=args.full)
    if args.full:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    for p in model.parameters():  # adapters in the compute dtype, as velotune's get_peft_model does
        if p.requires_grad:
            p.data = p.data.to(dtype)
    if args.velotune:
        from velotune.models import prepare_peft_model

        prepare_peft_model(model)
    return model


def run_mode(model, batches, device, warmup: int):
    """Forward+backward over every batch; returns (seconds for the timed part, summed token loss, tokens)."""

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the loss averages over
        loss = model(**batch).loss
        (loss * n).backward()  # sum over tokens: same gradients whatever the batching
        return float(loss.detach()) * n, n

    for b in batches[:warmup]:
        step(b)
    model.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    total_loss, total_tokens = 0.0, 0
    for b in batches:
        loss_sum, n = step(b)
        total_loss += loss_sum
        total_tokens += n
    sync()
    return time.perf_counter() - start, total_loss, total_tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-smoke to check the code path", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
    lengths = draw_lengths(
        args.samples, args.median_len, args.sigma, 32 if not args.cpu_smoke else 4, args.max_len, args.seed
    )
    vocab = (TINY if args.cpu_smoke else LLAMA_32_1B)["vocab_size"]
    pool = make_pool(lengths, vocab, args.seed)
    s = sorted(lengths)
    real = sum(lengths)
    print(
        f"pool: {len(s)} samples, {real} tokens; length median {s[len(s) // 2]}, mean {real / len(s):.0f}, "
        f"p90 {s[int(0.9 * len(s))]}, max {s[-1]}"
    )
    t1 = time.perf_counter()
    model = build_model(args, device, dtype)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"model built in {time.perf_counter() - t1:.1f}s ({'full' if args.full else 'LoRA r=16'}, {dtype}, "
        f"attn={args.attn}, velotune={args.velotune}, device={card}, torch {torch.__version__})"
    )
    results = []
    for mode in args.modes.split(","):
        if time.perf_counter() - t0 > args.max_seconds:
            print(f"  {mode:15s} skipped: --max-seconds={args.max_seconds:.0f} reached")
            continue
        batches = build_batches(mode, pool, args)
        processed = sum(int(b["input_ids"].numel()) for b in batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        secs, loss_sum, n_loss = run_mode(model, batches, device, args.warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        results.append(
            dict(
                mode=mode,
                steps=len(batches),
                real_tokens=real,
                processed_tokens=processed,
                pad_fraction=1 - real / processed,
                seconds=secs,
                tokens_per_s=real / secs,
                pool_loss=loss_sum / n_loss,
                loss_tokens=n_loss,
                peak_gib=peak,
            )
        )
        print(
            f"  {mode:15s} {len(batches):4d} steps  {secs:7.2f}s  {real / secs:10.0f} real tok/s  "
            f"pad {100 * (1 - real / processed):5.1f}%  loss {loss_sum / n_loss:.5f}  peak {peak:.1f} GiB",
            flush=True,
        )
    if not results:
        print("no mode ran", file=sys.stderr)
        return 1
    base = next((r for r in results if r["mode"] == "padded"), results[0])
    ref_loss = results[0]["pool_loss"]
    print("\n| mode | steps | pad tokens | real tokens/s | speed-up vs padded | pool loss | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['steps']} | {100 * r['pad_fraction']:.1f}% | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['pool_loss']:.5f} | {r['peak_gib']:.1f} |"
        )
    worst = max(abs(r["pool_loss"] - ref_loss) / abs(ref_loss) for r in results)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert all(r["loss_tokens"] == results[0]["loss_tokens"] for r in results), "modes disagree on trained tokens"
    print(f"\npool loss agrees across modes to {worst:.2e} relative (limit {tol:.0e})")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=2, default=str))
    common.write_rows(
        args.jsonl,
        "packing",
        [{**r, "speedup_vs_padded": r["tokens_per_s"] / base["tokens_per_s"]} for r in results],
        args.commit,
        device.type,
    )
    if worst > tol:
        print("FAIL: packed and padded modes disagree on the loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
