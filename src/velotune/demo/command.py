"""`velotune demo`: the one-command tour. No arguments, no network, no GPU needed.

1. load the shipped mini Llama (FastLanguageModel.from_pretrained) and ask it held-out questions;
2. fine-tune LoRA adapters on the shipped instruction data through `velotune train`'s code path
   (velotune.train.runner.run_training with a TrainConfig), with a progress bar and live loss;
3. ask the same questions again and show both answers side by side;
4. export the fine-tuned model (velotune.export.export_demo): merged safetensors and a q8_0 GGUF,
   which llama.cpp (llama-cpp-python) reads back to answer a held-out question;
5. leave the adapter, loss_curve.png, summary.json, merged/ and gguf/ in an output folder named at the end.

The held-out questions are about facts the model read only as plain sentences in pretraining;
the training data never asks about them. Fine-tuning teaches the question -> answer format, which
then unlocks those facts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from velotune.demo import assets_dir, dataset_path, heldout_path

DEFAULT_STEPS = 120
# Torch threads on the CPU. The model is so small that a second thread buys little (120 steps: ~11 s
# with 2 threads, ~13 s with 1, on 2 idle cores), while on a busy machine every tiny op's thread barrier
# waits for a descheduled thread: with one other 2-thread torch process running, 20 steps took 48 s with
# 2 threads and 6 s with 1. One thread keeps the demo well inside its time on a shared or CI machine.
CPU_THREADS = 1
SHOWN = 6  # held-out questions printed before/after (all of them are scored)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to save the adapter, loss curve and summary (default: ./velotune-demo-<time>)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if --output-dir holds another run, move it aside to OUTPUT_DIR.old-<time> first",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=3407, help="seed for LoRA initialisation and data order")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def demo_config(output_dir: Path, steps: int = DEFAULT_STEPS, seed: int = 3407, use_cpu: bool = False):
    """The TrainConfig of the demo: what `velotune train` would read from a YAML file."""
    from velotune.train.config import TrainConfig

    return TrainConfig(
        model={"name": str(assets_dir()), "max_seq_length": 128, "dtype": "auto"},
        data={"path": str(dataset_path()), "format": "messages", "train_on": "responses"},
        # A 2.7M-parameter model: rank 16 on every projection, no checkpointing (activations are tiny).
        lora={"r": 16, "alpha": 32, "gradient_checkpointing": False, "random_state": seed},
        training={
            "max_steps": steps,
            "batch_size": 16,
            "gradient_accumulation_steps": 1,
            "learning_rate": 3e-3,
            "lr_scheduler": "linear",
            "warmup_steps": 5,
            "seed": seed,
            "logging_steps": 5,
            "use_cpu": use_cpu,
        },
        output_dir=str(output_dir),
    )


def run(args: argparse.Namespace) -> int:
    import torch

    out = args.output_dir or Path(f"velotune-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    out = out.resolve()
    if args.steps <= 0:
        from velotune.errors import ConfigError

        raise ConfigError(f"--steps must be positive, got {args.steps}")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        return _run(args, out, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, out: Path, device: str) -> int:
    from velotune import FastLanguageModel
    from velotune.demo.answers import answer, expected, load_heldout, question, score
    from velotune.train.runner import run_training

    cfg = demo_config(out, steps=args.steps, seed=args.seed, use_cpu=device == "cpu")
    t0 = time.perf_counter()

    model, tokenizer = FastLanguageModel.from_pretrained(
        cfg.model.name, max_seq_length=cfg.model.max_seq_length, dtype=None, device_map="cpu" if args.cpu else None
    )
    n_params = sum(p.numel() for p in model.parameters())
    rows = load_heldout(heldout_path())
    questions = [question(r) for r in rows]
    _say(
        f"velotune demo: LoRA fine-tuning of the shipped {n_params / 1e6:.1f}M-parameter Llama "
        f"({model.dtype}, {device}) on {_count_lines(dataset_path())} question/answer conversations."
    )
    _say(
        f"Before training, the model has read facts as plain text but never seen a question. "
        f"Asking {len(rows)} held-out questions..."
    )
    before = answer(model, tokenizer, questions)

    result = run_training(cfg, model=model, tokenizer=tokenizer, overwrite=getattr(args, "overwrite", False))
    after = answer(result.model, tokenizer, questions)

    s_before, s_after = score(before, rows), score(after, rows)
    _say("\nHeld-out questions (never in the training data):")
    for q, b, a, row in list(zip(questions, before, after, rows))[:SHOWN]:
        mark = "ok" if a == expected(row) else "wrong"
        _say(f"  Q: {q}\n     before: {_clip(b)}\n     after:  {_clip(a)}   [{mark}]")
    _say(
        f"\nExact answers to all {len(rows)} held-out questions: before {s_before['exact']}/{len(rows)}, "
        f"after {s_after['exact']}/{len(rows)}  (right fact in the first sentence: "
        f"{s_before['fact']} -> {s_after['fact']})"
    )

    from velotune.export.demo import export_demo

    # Export what was just trained and read the GGUF back with llama.cpp: the first held-out question,
    # answered by llama.cpp from the q8_0 file instead of transformers from memory.
    _say("\nExporting the fine-tuned model: merged safetensors and a q8_0 GGUF...")
    t_export = time.perf_counter()
    gguf_question = questions[0]
    exported = export_demo(result.model, tokenizer, out, question=gguf_question)
    export_seconds = time.perf_counter() - t_export
    if exported["answer"] is None:
        gguf_answer, same = None, None
        _say(
            f"wrote {exported['gguf_path'].name}; llama-cpp-python is not installed, so it was not read back "
            '(pip install "velotune[llamacpp]")'
        )
    else:
        gguf_answer = exported["answer"].strip()
        same = gguf_answer == after[0]
        _say(
            f"llama.cpp, reading {exported['gguf_path'].name}:\n  Q: {gguf_question}\n  A: {_clip(gguf_answer)}"
            f"   [{'same as' if same else 'differs from'} the fine-tuned model in transformers]"
        )

    from velotune.train.callbacks import write_json

    summary = dict(result.summary)
    summary["demo"] = {
        "heldout_before": s_before,
        "heldout_after": s_after,
        "device": device,
        "cpu_threads": CPU_THREADS if device == "cpu" else None,
        "export": {
            "merged_dir": str(exported["merged_dir"]),
            "gguf_path": str(exported["gguf_path"]),
            "modelfile": str(exported["modelfile"]),
            "seconds": round(export_seconds, 1),
            "llama_cpp": {
                "question": gguf_question,
                "answer": gguf_answer,
                "transformers_answer": after[0],
                "same": same,
            },
        },
        "seconds_total": round(time.perf_counter() - t0, 1),
        "examples": [
            {"question": q, "expected": expected(r), "before": b, "after": a}
            for q, b, a, r in zip(questions, before, after, rows)
        ],
    }
    write_json(result.summary_path, summary)
    first, last = summary.get("first_loss"), summary.get("last_loss")
    loss = f"loss {first:.3f} -> {last:.3f}, " if first is not None and last is not None else ""
    steps = summary.get('steps', args.steps)
    _say(f"\nDone in {time.perf_counter() - t0:.0f} s ({loss}{steps} steps). Saved in {out}:")
    _say(f"  LoRA adapter   {out}/adapter_model.safetensors (+ adapter_config.json, tokenizer)")
    _say(f"  loss curve     {result.png_path}")
    _say(f"  summary        {result.summary_path}")
    _say(f"  merged model   {exported['merged_dir']}/ (safetensors, transformers / vLLM)")
    _say(f"  GGUF           {exported['gguf_path']} (+ Modelfile; llama.cpp / Ollama)")
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def _clip(text: str, width: int = 70) -> str:
    text = " ".join(text.split()) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
