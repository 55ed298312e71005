"""Generation speed: velotune's decode path against stock transformers `generate`, same run, same weights.

    PYTHONPATH=.devsite:src python bench/generate.py --lora --jsonl bench/results/generate.jsonl

Model: Llama-3.1-8B shape (32 layers, hidden 4096, GQA 32/8, vocab 128256, llama3 RoPE) with random
weights made on the GPU; bf16, then the same weights quantised to NF4 (bitsandbytes, double quant).
Per batch size: a random 256-token prompt, 256 new tokens (greedy, eos disabled so every run makes
all 256), one warm-up call then one timed call of each contender. Stock runs `model.generate` with
its default cache (DynamicCache); velotune runs `FastLanguageModel.for_inference(model)` then the same
`model.generate` call. Tokens/s = batch * new tokens / wall time of the call (prefill included).

Correctness, same run (bf16, batch 1): the greedy tokens of both paths are compared (length of the
agreeing prefix), and on the stock path's continuation, teacher-forced, the logits of velotune's
decode steps and of stock's forward are compared against an fp32 copy of the model.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts src/ on sys.path)
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: only for a --tiny dry run of this script


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def llama31_8b_config(layers: int, tiny: bool = False):
    from transformers import LlamaConfig

    size = (
        dict(vocab_size=512, hidden_size=128, intermediate_size=256)
        if tiny
        else dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336)
    )
    return LlamaConfig(
        **size,
        num_hidden_layers=layers,
        num_attention_heads=32 if not tiny else 4,
        num_key_value_heads=8 if not tiny else 2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=None,
        pad_token_id=0,
        rope_parameters={**common.LLAMA3_ROPE, "factor": 8.0},
    )


def build_model(layers: int, tiny: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(llama31_8b_config(layers, tiny), dtype=torch.bfloat16)
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def quantise_nf4(model) -> None:
    """Replace every decoder nn.Linear by a bitsandbytes NF4 Linear4bit (double quant) holding the same weights."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(DEVICE)
                setattr(parent, name, q)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def timed_generate(model, ids, new_tokens):
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up (and graph capture)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync()
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return out[:, ids.shape[1] :], ids.shape[0] * new_tokens / dt


def agreeing_prefix(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    same = (a == b).int()
    return [int(row.cumprod(0).sum()) for row in same]


@torch.no_grad()
def reference_logits(model, prompt, continuation):
    """fp32 and stock bf16 logits predicting each continuation token (teacher forced). -> 2 x [1, N, V]"""
    full = torch.cat([prompt, continuation], dim=1)
    T = prompt.shape[1]
    stock = model(full).logits[:, T - 1 : -1].float()
    ref_model = copy.deepcopy(model).float()
    ref = ref_model(full).logits[:, T - 1 : -1].float()
    del ref_model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return ref, stock


@torch.no_grad()
def velotune_logits(engine, prompt, continuation):
    """The same logits from velotune's prefill + decode steps (the path generate takes)."""
    engine.reserve(1, prompt.shape[1] + continuation.shape[1])
    steps = [engine.prefill(prompt)]
    for j in range(continuation.shape[1] - 1):
        steps.append(engine.decode(continuation[:, j]))
    return torch.stack(steps, dim=1).float()


def run(args) -> dict:
    from velotune.infer import _STATE, for_inference, for_training

    results = {
        "card": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "rows": [],
        "checks": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    results["commit"] = args.commit
    t_start = time.perf_counter()
    model = build_model(args.layers, args.tiny)
    vocab = model.config.vocab_size
    g = torch.Generator(device=DEVICE).manual_seed(1)
    prompts = {
        b: torch.randint(vocab // 100, vocab - 1, (b, args.prompt), device=DEVICE, generator=g) for b in args.batches
    }

    def bench(label, m, batches):
        for b in batches:
            if time.perf_counter() - t_start > args.time_budget:
                print(f"[skip] {label} batch {b}: time budget spent", flush=True)
                continue
            stock_tokens, stock_tps = timed_generate(m, prompts[b], args.new)
            check = label == "bf16" and b == 1 and args.check
            if check:
                ref, stock = reference_logits(m, prompts[1], stock_tokens[:, : args.check])
            for_inference(m)
            engine = m.__dict__[_STATE]["engine"]
            fast_tokens, fast_tps = timed_generate(m, prompts[b], args.new)
            graphs = bool(engine.cuda_graphs)
            if check:
                ours = velotune_logits(engine, prompts[1], stock_tokens[:, : args.check])
                rel = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
                results["checks"]["bf16_batch1_teacher_forced_logits"] = {
                    "tokens": args.check,
                    "stock_rel_err_vs_fp32": rel(stock),
                    "velotune_rel_err_vs_fp32": rel(ours),
                    "max_abs_diff_velotune_vs_stock": float((ours - stock).abs().max()),
                    "argmax_agree": float((ours.argmax(-1) == stock.argmax(-1)).float().mean()),
                }
                print(json.dumps(results["checks"]), flush=True)
            for_training(m, use_gradient_checkpointing=False)
            extra = {}
            if args.ab and b == 1 and label == "bf16":  # the same with plain torch ops inside the graph
                for_inference(m, fused=False)
                extra["velotune_unfused_tps"] = round(timed_generate(m, prompts[b], args.new)[1], 1)
                for_training(m, use_gradient_checkpointing=False)
            m.eval()
            m.config.use_cache = True
            agree = agreeing_prefix(stock_tokens, fast_tokens)
            row = dict(
                model=label,
                batch=b,
                stock_tps=round(stock_tps, 1),
                velotune_tps=round(fast_tps, 1),
                speedup=round(fast_tps / stock_tps, 2),
                cuda_graphs=graphs,
                fused=bool(engine.fused),
                **extra,
                agree_prefix_min=min(agree),
                agree_prefix_mean=round(sum(agree) / len(agree), 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == "cuda" else 0,
            )
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

    bench("bf16", model, args.batches)
    if "4bit" in args.modes and time.perf_counter() - t_start < args.time_budget:
        quantise_nf4(model)
        bench("nf4", model, args.batches)
    if args.lora and time.perf_counter() - t_start < args.time_budget:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(2)
        pm = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(torch.bfloat16)
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        pm.eval()
        label = "nf4+LoRA r16 (QLoRA)" if "4bit" in args.modes else "bf16+LoRA r16"
        bench(label, pm, [1])
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--modes", nargs="+", default=["bf16", "4bit"])
    p.add_argument("--lora", action="store_true", help="also bf16 + LoRA r=16 (unmerged) at batch 1")
    p.add_argument("--ab", action="store_true", help="also time velotune without the fused kernels (bf16, batch 1)")
    p.add_argument("--check", type=int, default=32, help="teacher-forced logit check over this many tokens (0: off)")
    p.add_argument("--time-budget", type=float, default=240.0, help="skip remaining runs after this many seconds")
    p.add_argument("--tiny", action="store_true", help="a toy-size model (dry run of this script, CPU ok)")
    p.add_argument("--out", default=None, help="all results (rows, checks, versions) as one JSON file")
    common.add_output_args(p)
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.tiny:
        print("bench/generate.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = run(args)
    results["python"] = platform.python_version()
    print(
        "\n| model | batch | stock tok/s | velotune tok/s | speed-up | graphs | greedy agree (min/mean of %d) |"
        % args.new
    )
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(
            f"| {r['model']} | {r['batch']} | {r['stock_tps']} | {r['velotune_tps']} | {r['speedup']}x | "
            f"{r['cuda_graphs']} | {r['agree_prefix_min']}/{r['agree_prefix_mean']} |"
        )
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    common.write_rows(
        args.jsonl,
        "generate",
        [{**r, "prompt": args.prompt, "new_tokens": args.new} for r in results["rows"]],
        args.commit,
        DEVICE,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
