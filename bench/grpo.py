"""One GRPO step (generation + update) with TRL's GRPOTrainer: velotune vs stock transformers + PEFT.

Random-weight Llama shapes (bench/common.py: 1b, 8b; "tiny" for the CPU smoke run) built on the device,
LoRA r=16 alpha=16 on the 7 projections (common.build); QLoRA: every decoder projection in NF4 with
double quantisation. Each contender runs in its own process (clean peak-memory figures).

  velotune-lora / velotune-qlora   FastLanguageModel.get_peft_model (common.build) in trl.GRPOTrainer,
                                   velotune's GRPO glue installed (velotune.train.grpo.install): rollouts
                                   on the decode engine, log-probs through velotune's head
  velotune-lora-plain / ...-plain  the same model in a plain trl.GRPOTrainer (no install): velotune's
                                   decoder stack under stock generate and TRL's head
  stock-lora / stock-qlora         PEFT get_peft_model (common.stock_peft), stock generate, TRL's head

The workload: --batch completions per step (--generations per prompt), prompts of random words of a
word-level tokenizer over the whole vocabulary (lengths uniform in [prompt_len / 2, prompt_len], so the
batch is left padded), exactly --completion-len new tokens per completion (min_new_tokens: every
contender generates the same number of tokens whatever it samples), a length reward, beta 0, bf16
autocast on the GPU, TRL's default gradient checkpointing (velotune keeps its offloaded one), AdamW.
Per optimizer step (CUDA synchronised): wall time, of which generation (TRL's _generate_single_turn);
--warmup steps first, then --steps timed ones; ms_per_step is their median.

    python bench/grpo.py --shapes 1b 8b --jsonl bench/results/grpo.jsonl
    python bench/grpo.py --shapes 8b --impls stock-qlora velotune-qlora --steps 3
    python bench/grpo.py --cpu-smoke                       # the code path on the CPU, tiny model, 1 step

Sampling differs between the contenders' engines (the same distribution, other draws on a GPU), so
losses are not compared here: tests/train/test_grpo.py checks exactness against stock TRL in fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

IMPLS = (
    "velotune-lora",
    "velotune-qlora",
    "stock-lora",
    "stock-qlora",
    "velotune-lora-plain",
    "velotune-qlora-plain",
)


def prompts(n: int, max_len: int, words: int, seed: int = 0):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(max(1, max_len // 2), max_len)
        rows.append(" ".join(f"w{rng.randrange(words)}" for _ in range(length)))
    return Dataset.from_dict({"prompt": rows})


def reward_length(completions, **kw):
    return [float(len(c)) for c in completions]


def worker(args) -> dict:
    """One contender in this process: build, train warmup + steps GRPO steps; the result row."""
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    device, dtype = args.device, (torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    cuda = device.startswith("cuda")
    plain = args.impl.endswith("-plain")
    impl = args.impl[: -len("-plain")] if plain else args.impl
    velotune = impl.startswith("velotune")
    cfg = common.config(args.shape)
    cfg.pad_token_id = 0
    seq = args.prompt_len + args.completion_len
    model = common.build(impl, cfg, device, dtype, seq)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    tok = common.word_tokenizer(cfg.vocab_size)
    steps = args.warmup + args.steps
    data = prompts(args.batch // args.generations * steps, args.prompt_len, cfg.vocab_size - 4)
    out_dir = tempfile.mkdtemp(prefix="velotune-grpo-bench-")
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.completion_len,
        generation_kwargs={"min_new_tokens": args.completion_len},
        max_steps=steps,
        learning_rate=1e-5,
        bf16=cuda and dtype == torch.bfloat16,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=3407,
        disable_tqdm=True,
        dataloader_num_workers=0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_length, args=config, train_dataset=data, processing_class=tok
    )
    installed = None
    if velotune and not plain:
        from velotune.train import grpo

        installed = grpo.install(trainer)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step_ms: list[float] = []
    gen_ms: list[float] = []
    plain_generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        sync()
        t0 = time.perf_counter()
        result = plain_generate(*a, **kw)
        sync()
        gen_ms.append(1000 * (time.perf_counter() - t0))
        return result

    trainer._generate_single_turn = timed_generate

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **kw):
            sync()
            step_ms.append(1000 * (time.perf_counter() - self.t0))

    trainer.add_callback(StepTimer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        return {"impl": args.impl, "shape": args.shape, "oom": True}
    timed, timed_gen = step_ms[args.warmup :], gen_ms[args.warmup :]
    ms = statistics.median(timed)
    gen = statistics.median(timed_gen)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    out = {
        "impl": args.impl,
        "shape": args.shape,
        "mode": "qlora" if impl.endswith("qlora") else "lora",
        "oom": False,
        "batch": args.batch,
        "generations": args.generations,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "ms_per_step": ms,
        "ms_per_step_rounds": timed,
        "generate_ms": gen,
        "update_ms": ms - gen,
        "completion_tokens_per_s": args.batch * args.completion_len / (ms / 1000),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_reward": rewards[0] if rewards else None,
        "device": common.card(device),
    }
    if velotune:
        from velotune.infer.rollout import fast_generate_calls
        from velotune.models.padding_free import padding_free_stats

        out["glue"] = installed  # None: a plain GRPOTrainer
        out["engine_generate_calls"] = fast_generate_calls(model)
        out["padding_free"] = padding_free_stats(model)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["stock-lora", "velotune-lora", "stock-qlora", "velotune-qlora"])
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=list(common.SHAPES))
    ap.add_argument("--batch", type=int, default=8, help="completions per step (per_device_train_batch_size)")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt (num_generations)")
    ap.add_argument("--prompt-len", type=int, default=128, help="longest prompt, in tokens")
    ap.add_argument("--completion-len", type=int, default=256, help="new tokens per completion")
    ap.add_argument("--steps", type=int, default=3, help="timed GRPO steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per contender process")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, 1 timed step: the code path")
    common.add_output_args(ap)
    ap.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bad = [i for i in args.impls if i not in IMPLS]
    if bad:
        ap.error(f"unknown contender(s) {bad}; choose from {list(IMPLS)}")
    if args.batch % args.generations:
        ap.error(f"--batch {args.batch} must be a multiple of --generations {args.generations}")
    if args.cpu_smoke:
        args.device, args.shapes, args.dtype = "cpu", ["tiny"], "fp32"
        args.steps, args.warmup, args.batch, args.generations = 1, 1, 4, 2
        args.prompt_len, args.completion_len = 8, 6
    if args.worker:
        args.impl = args.worker
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    print(
        f"{common.card(args.device)}  commit {args.commit}  batch {args.batch} ({args.generations} per prompt), "
        f"prompts <= {args.prompt_len}, completions {args.completion_len} tokens",
        flush=True,
    )
    rows = []
    for shape in args.shapes:
        argv = [
            "--shape",
            shape,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--batch",
            str(args.batch),
            "--generations",
            str(args.generations),
            "--prompt-len",
            str(args.prompt_len),
            "--completion-len",
            str(args.completion_len),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ]
        res = {}
        for impl in args.impls:
            r = common.run_worker(__file__, ["--worker", impl, *argv], timeout=args.timeout)
            if r is None or r.get("oom") or r.get("timeout"):
                status = "failed" if r is None else "OOM" if r.get("oom") else "timeout"
                print(f"  {shape} {impl}: {status}", flush=True)
                rows.append({"impl": impl, "shape": shape, **(r or {"failed": True})})
                continue
            res[impl] = r
            print(
                f"  {shape:<5}{impl:<22}{r['ms_per_step']:>10.1f} ms/step  (generation {r['generate_ms']:.1f} ms, "
                f"update {r['update_ms']:.1f} ms)  {r['completion_tokens_per_s']:>8.1f} completion tok/s"
                + (f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""),
                flush=True,
            )
        for name, v in res.items():  # each velotune contender against the stock one of its mode
            if not name.startswith("velotune"):
                continue
            stock = res.get(f"stock-{v['mode']}")
            if stock is None:
                continue
            speed = stock["ms_per_step"] / v["ms_per_step"]
            v["speedup_vs"] = {stock["impl"]: speed}
            v["generate_speedup_vs"] = {stock["impl"]: stock["generate_ms"] / v["generate_ms"]}
            print(f"{shape} {name} / {stock['impl']}: {speed:.2f}x per GRPO step", flush=True)
        rows.extend(res.values())
    common.write_rows(args.jsonl, "grpo", rows, args.commit, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
