"""What every benchmark in bench/ shares: model shapes, random-weight models built on the device, the
contenders (velotune, stock transformers + PEFT, Liger-Kernel; bf16 or bitsandbytes NF4), the timed
training step, GPU-time profiles, peak memory, worker processes and the JSON-lines results.

A script imports it as

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402

Importing it puts this checkout's src/ first on sys.path (no install needed). No file in bench/ is
named like a package that transformers, PEFT, bitsandbytes or Liger import (`kernels`, for one), since
a script's own folder comes first on sys.path.

Results: `write_rows(path, subject, rows)` appends one JSON object per line, each with the card, the
date, the commit and the command that produced it (bench/results/<subject>.jsonl holds the rows the
docs cite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# What Gemma 3's published text checkpoints (4B, 12B) share
_GEMMA3 = dict(
    model_type="gemma3_text",
    head_dim=256,
    query_pre_attn_scalar=256,
    vocab_size=262208,
    max_position_embeddings=131072,
    sliding_window=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
)
SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={**LLAMA3_ROPE, "factor": 8.0},
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_parameters={**LLAMA3_ROPE, "factor": 32.0},
    ),
    # CPU smoke runs: a multiple of 64 in every NF4-quantised dimension (bitsandbytes' block size)
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1 << 20,
        tie_word_embeddings=False,
    ),
    # Larger than one card holds in bf16 (bench/make_checkpoint.py writes them to disk, --checkpoint loads them)
    "70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_parameters={**LLAMA3_ROPE, "factor": 8.0},
    ),
    "34b": dict(  # CodeLlama-34B
        hidden_size=8192,
        intermediate_size=22016,
        num_hidden_layers=48,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "27b": dict(  # Gemma-2-27B
        model_type="gemma2",
        hidden_size=4608,
        intermediate_size=36864,
        num_hidden_layers=46,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        vocab_size=256000,
        max_position_embeddings=8192,
        query_pre_attn_scalar=144,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    "12b": dict(  # Mistral-Nemo-12B
        model_type="mistral",
        hidden_size=5120,
        intermediate_size=14336,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=131072,
        max_position_embeddings=1024000,
        sliding_window=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # CPU tests of bench/make_checkpoint.py (a vocabulary its small tokenizer covers)
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "tiny-gemma2": dict(
        model_type="gemma2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=384,
        max_position_embeddings=256,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
    # Other families (model_type: the transformers config), at the published checkpoints' shapes
    "qwen3-8b": dict(
        model_type="qwen3",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "gemma3-4b": dict(
        _GEMMA3,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
    "gemma3-12b": dict(
        _GEMMA3,
        hidden_size=3840,
        intermediate_size=15360,
        num_hidden_layers=48,
        num_attention_heads=16,
        num_key_value_heads=8,
    ),
    "ministral-8b": dict(
        model_type="ministral",
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=131072,
        max_position_embeddings=32768,
        sliding_window=32768,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000000.0},
    ),
    # the generic path (models without a family file): Pythia-6.9B (GPT-NeoX) and Aya-23-8B (Cohere) shapes
    "pythia-6.9b": dict(
        model_type="gpt_neox",
        hidden_size=4096,
        intermediate_size=16384,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=50432,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    "aya-8b": dict(
        model_type="cohere",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=256000,
        max_position_embeddings=8192,
        logit_scale=0.125,
        tie_word_embeddings=True,
    ),
    "pythia-tiny": dict(
        model_type="gpt_neox",
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=4096,
        rotary_pct=0.25,
    ),
    "cohere-tiny": dict(
        model_type="cohere",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=4096,
        logit_scale=0.125,
        tie_word_embeddings=True,
    ),
}
# LoRA targets of model types whose projections are not the 7 Llama names
MODEL_TARGETS = {"gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}
OPTIMIZERS = ("adamw", "offloaded", "offloaded-in-backward")


def config(shape: str, checkpoint: Path | None = None):
    """The config of `shape` (SHAPES; model_type llama unless named), or of a checkpoint folder."""
    from transformers import AutoConfig, LlamaConfig

    if checkpoint is not None:
        cfg = AutoConfig.from_pretrained(checkpoint)
        cfg.use_cache = False
        return cfg
    kw = dict(SHAPES[shape])
    model_type = kw.pop("model_type", "llama")
    if model_type != "llama":
        return AutoConfig.for_model(model_type, **kw, bos_token_id=1, eos_token_id=2, use_cache=False)
    return LlamaConfig(**kw, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, use_cache=False)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary: "w17" <-> id 21; <pad>=0, <s>=1, </s>=2, <unk>=3
    (every id a model can sample decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(vocab_size - 4)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.model_max_length = 1 << 20
    return out


def targets(cfg) -> list[str]:
    return MODEL_TARGETS.get(cfg.model_type, TARGETS)


def load(impl: str, checkpoint: Path, device: str, dtype: torch.dtype, seq: int):
    """A contender's model from a folder (bench/make_checkpoint.py writes pre-quantised ones): velotune
    through FastLanguageModel.from_pretrained (its fit check; the fused forward prepared), stock through
    AutoModelForCausalLM.from_pretrained with bitsandbytes' 4-bit config unless the folder is 4-bit."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qlora = impl.endswith("qlora")
    pre_quantised = "quantization_config" in json.loads((Path(checkpoint) / "config.json").read_text())
    if pre_quantised and not qlora:
        raise SystemExit(f"{impl}: {checkpoint} is pre-quantised; the 16-bit contenders need a 16-bit checkpoint")
    if impl.startswith("velotune"):
        from velotune import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            checkpoint, max_seq_length=seq, dtype=dtype, load_in_4bit=qlora, attn_implementation="sdpa"
        )
        return model.to(device) if not device.startswith("cuda") else model
    kw = {"dtype": dtype, "attn_implementation": "sdpa"}
    if device.startswith("cuda"):
        kw["device_map"] = {"": torch.cuda.current_device()}
    if qlora and not pre_quantised:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kw)
    return model if device.startswith("cuda") else model.to(device)


def add_model_args(ap) -> None:
    """--checkpoint, --offload-every, --host-budget-gib (qlora.py and context.py)."""
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="load the model from this folder (bench/make_checkpoint.py) instead of making it",
    )
    ap.add_argument(
        "--offload-every",
        default=None,
        help="velotune: get_peft_model(offload_every=): a whole number or 'auto' (memory/sparse_offload.py); "
        "default: the library's",
    )
    ap.add_argument(
        "--host-budget-gib",
        type=float,
        default=0.0,
        help="velotune: get_peft_model(host_memory_budget=) in GiB (0: measured by 'auto')",
    )


def model_argv(args) -> list[str]:
    return (
        (["--offload-every", args.offload_every] if args.offload_every is not None else [])
        + (["--checkpoint", str(args.checkpoint)] if args.checkpoint else [])
        + (["--host-budget-gib", str(args.host_budget_gib)] if args.host_budget_gib else [])
    )


def memory_options(args) -> dict:
    """The get_peft_model memory keywords given on a bench script's command line (--recompute,
    --cuda-graphs, --offload-embedding, --mlp-row-blocks, --offload-every, --host-budget-gib, those the
    script has); the library's defaults for the rest."""
    given = dict(
        recompute=getattr(args, "recompute", None),
        cuda_graphs=getattr(args, "cuda_graphs", False) or None,
        offload_embedding=getattr(args, "offload_embedding", False) or None,
        mlp_row_blocks=getattr(args, "mlp_row_blocks", None),
    )
    out = {k: v for k, v in given.items() if v is not None}
    return {**out, **offload_options(args)} if hasattr(args, "offload_every") else out


def offload_options(args) -> dict:
    """get_peft_model's offload_every / host_memory_budget where given (else the library's defaults)."""
    out = {}
    if args.offload_every is not None:
        out["offload_every"] = args.offload_every if args.offload_every == "auto" else int(args.offload_every)
    if args.host_budget_gib:
        out["host_memory_budget"] = int(args.host_budget_gib * 2**30)
    return out


def n_matmul(cfg) -> int:
    """Parameters that take part in a matmul per token: decoder linears + lm_head (tied or not)."""
    if cfg.model_type != "llama":  # other layouts: the Linear weights of the model built on the meta device
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    return layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + cfg.vocab_size * h


def flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token (no recomputation): 4 N_matmul + 12 layers hidden seq."""
    return 4 * n_matmul(cfg) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


# ------------------------------------------------------------------ contenders
def quantize_linears_(model, compute_dtype: torch.dtype) -> int:
    """Replace every decoder projection (an nn.Linear named in TARGETS) by a bitsandbytes NF4 `Linear4bit`
    with double quantisation, quantised on the weight's own device (what `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` loads); frees each 16-bit weight as it goes."""
    import bitsandbytes as bnb

    n = 0
    for _, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is torch.nn.Linear:
                dev = child.weight.device
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                    quant_storage=torch.uint8,
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data,
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                    blocksize=64,
                    quant_storage=torch.uint8,
                    module=q,
                ).to(dev)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, child_name, q)
                n += 1
    model.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes-4-bit model
    return n


def build(
    impl: str,
    cfg,
    device: str,
    dtype: torch.dtype,
    seq: int,
    memory: dict | None = None,
    checkpoint: Path | None = None,
):
    """A random-weight model made on `device` with LoRA r=16 alpha=16 on the 7 projections and
    gradient checkpointing, for one contender:

      velotune-lora / velotune-qlora   FastLanguageModel.get_peft_model(**memory) on the bf16 / NF4 model
      stock-lora / stock-qlora         PEFT get_peft_model, non-reentrant checkpointing (4-bit: after
                                       prepare_model_for_kbit_training)
      liger-lora                       stock-lora with Liger-Kernel's Llama kernels patched in

    `memory`: get_peft_model keywords of the velotune contenders; the library's defaults for the rest.
    `checkpoint`: the model is loaded from that folder (`load`) instead of made from `cfg`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if checkpoint is not None:
        model = load(impl, checkpoint, device, dtype, seq)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
        if impl.endswith("qlora"):
            quantize_linears_(model, dtype)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if impl.startswith("velotune"):
        from velotune import FastLanguageModel
        from velotune.models import prepare_model

        if checkpoint is None:  # from_pretrained prepared a loaded one
            model.velotune_compute_dtype = dtype
            model.max_seq_length = seq
            prepare_model(model, max_seq_length=seq)
        return FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=16,
            target_modules=targets(cfg),
            random_state=3407,
            **(memory or {}),
        )
    if impl == "liger-lora":
        if cfg.model_type != "llama":
            raise SystemExit(f"liger-lora: Llama shapes only, not {cfg.model_type!r}")
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model
        )
    elif impl not in ("stock-lora", "stock-qlora"):
        raise SystemExit(f"unknown contender {impl!r}")
    return stock_peft(model, targets(cfg), quantized=impl == "stock-qlora")


def stock_peft(model, target_modules: list[str], quantized: bool):
    """Stock transformers + PEFT as its users run it: non-reentrant gradient checkpointing
    (`prepare_model_for_kbit_training` for a 4-bit base), no KV cache, LoRA r=16 (seed 3407)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(3407)
    return get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=16, target_modules=target_modules, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
        ),
    )


def training_step(model, batch_size: int, seq: int, device: str, optimizer: str = "adamw"):
    """(step, trainable params, optimizer, batch): one AdamW step (fused on CUDA) on a fixed random batch,
    labels = input ids. optimizer: "adamw" (torch), "offloaded" (velotune.OffloadedAdamW: moments in pinned
    host memory, the same bits), "offloaded-in-backward" (OffloadedAdamW(update_in_backward=True): each
    chunk updated in backward once its gradients are final; this step has no clipping or accumulation,
    so the same bits)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    elif optimizer in ("offloaded", "offloaded-in-backward"):
        from velotune import OffloadedAdamW

        opt = OffloadedAdamW(params, lr=1e-4, fused=fused, update_in_backward=optimizer == "offloaded-in-backward")
    else:
        raise SystemExit(f"unknown optimizer {optimizer!r}; one of {OPTIMIZERS}")
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq), device=device, generator=g)
    batch = {"input_ids": ids, "labels": ids}

    def step():
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, params, opt, batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(step, warmup: int, steps: int, device: str, before_timed=None) -> dict:
    """Warm-up steps, then `steps` timed back to back (wall time, one synchronize at the end: the host's
    time counts where the GPU waits for it). before_timed(): called between the two (e.g. a peak reset)."""
    first = None
    for i in range(warmup):
        loss = step()
        if i == 0:
            first = loss.item()
    sync(device)
    if before_timed is not None:
        before_timed()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "ms_per_step": 1000 * elapsed / steps, "first_loss": first, "last_loss": loss.item()}


def graph_pool_bytes() -> int:
    """Device memory the allocator holds for CUDA-graph pools. A replay uses it without allocating, so
    max_memory_allocated does not count it: a graphed contender's peak is its allocated peak over the
    timed steps plus this (0 without graphs)."""
    return sum(
        seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)
    )


def embeddings_offloaded(model) -> bool:
    """Whether get_peft_model(offload_embedding=True) moved the input embeddings to host memory."""
    try:
        from velotune.memory.embedding_offload import embeddings_offloaded as offloaded
    except ImportError:  # a tree from before the memory package (bench/qlora.py --base-src)
        from velotune.memory.embedding_offload import embeddings_offloaded as offloaded
    return offloaded(model)


# ------------------------------------------------------------------ GPU time by category
_CATEGORIES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("fp32 GEMMs", ("f32f32", "sgemm", "gemm_f32", "tf32")),
    ("bf16 GEMMs", ("nvjet", "gemm", "xmma", "cutlass", "wgmma")),
    ("optimizer", ("adam", "multi_tensor")),
    ("copies and casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill", "cat_")),
    ("4-bit dequant", ("nf4", "dequantize")),
    ("triton (norm/rope/glu/CE)", ("triton", "_kernel")),
    ("elementwise and reductions", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "index")),
)


def _category(name: str) -> str:
    n = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "other"


def profile(step, n_steps: int = 3) -> dict:
    """GPU ms per step by kernel category and the 25 most expensive kernels, over n_steps profiled steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1000 / n_steps
    per_cat: dict[str, float] = {}
    kernels: list[tuple[float, str]] = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if not us:
            continue
        ms = us / 1000.0 / n_steps
        per_cat[_category(e.key)] = per_cat.get(_category(e.key), 0.0) + ms
        kernels.append((ms, e.key))
    kernels.sort(reverse=True)
    return {
        "categories": per_cat,
        "gpu_ms_per_step": sum(per_cat.values()),
        "profiled_wall_ms_per_step": wall,
        "top_kernels": [(round(ms, 2), k[:110]) for ms, k in kernels[:25]],
    }


def print_profile(name: str, prof: dict) -> None:
    cats = prof["categories"]
    print(
        f"  GPU time per step, {name}: {prof['gpu_ms_per_step']:.1f} ms (profiled wall "
        f"{prof['profiled_wall_ms_per_step']:.1f} ms)",
        flush=True,
    )
    for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"    {cat:<30} {ms:>8.1f} ms  {100 * ms / prof['gpu_ms_per_step']:5.1f}%")
    for ms, k in prof["top_kernels"]:
        print(f"      {ms:>7.2f}  {k}")


# ------------------------------------------------------------------ worker processes
def run_worker(script: str, argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict | None:
    """Run `script` (a bench file) in a fresh process; its result is the JSON after "RESULT " on stdout.
    {"oom": True} when it ran out of device memory, {"timeout": True}, or None (failure printed)."""
    try:
        proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        print(f"worker {argv} timed out after {timeout:.0f} s", flush=True)
        return {"timeout": True}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    if "OutOfMemoryError" in proc.stderr or "CUDA out of memory" in proc.stderr:
        return {"oom": True}
    print(f"worker {argv} failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}", flush=True)
    return None


def median_run(runs: list[dict], key: str = "tokens_per_s") -> dict:
    """The run with the median `key` (the lower middle one of an even count); all values kept in key_rounds."""
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out[f"{key}_rounds"] = [r[key] for r in runs]
    return out


# ------------------------------------------------------------------ results
def card(device: str = "cuda") -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def default_commit() -> str:
    """GIT_COMMIT from the environment, else the working tree's HEAD (short), else "?"."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            or "?"
        )
    except (OSError, subprocess.CalledProcessError):
        return "?"


def command() -> str:
    """How this process was started, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    name = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else sys.argv[0]
    return " ".join(["python", name, *sys.argv[1:]])


def add_output_args(ap) -> None:
    ap.add_argument("--commit", default=default_commit(), help="recorded with each row (default: GIT_COMMIT or HEAD)")
    ap.add_argument(
        "--jsonl", type=Path, help="append the result rows to this JSON-lines file (e.g. bench/results/<subject>.jsonl)"
    )


def write_rows(path: Path | None, subject: str, rows: list[dict], commit: str, device: str = "cuda") -> None:
    """Append rows to a JSON-lines file, each with subject, card, date, commit and command."""
    if path is None or not rows:
        return
    head = {
        "subject": subject,
        "card": card(device),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": commit,
        "command": command(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**head, **row}) + "\n")
    print(f"{len(rows)} row(s) appended to {path}", flush=True)
