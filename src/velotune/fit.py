"""Will this model train on this card? A memory estimate from the config alone, and the refusal
`FastLanguageModel.from_pretrained` raises before it allocates anything.

    est = estimate_memory(config, compute_dtype=torch.bfloat16, load_in_4bit=True, seq_len=8192)
    est.gpu_bytes, est.host_bytes, est.describe()
    check_fit(est, cap_bytes)          # ModelLoadError naming the estimate and what would fit

What is counted (bytes; `P` = parameters by shape, from a meta-device model built from the config,
so nothing is allocated and every family's real module tree is used):

* weights: decoder `nn.Linear` weights (every linear but the output embedding, as transformers'
  bitsandbytes loader chooses) in NF4 with double quantisation when 4-bit: 1/2 byte per element +
  1 uint8 absmax per block of 64 + one fp32 per 256 absmax (`quant/nf4.py`); everything else
  (embeddings, norms, lm_head, biases) in the compute dtype.
* 4-bit dequantisation buffers: 2 slots (quant/weights.BUFFER_SLOTS) of the largest quantised
  weight in the compute dtype.
* LoRA (rank `lora_rank` on every quantised-or-not decoder linear; 0 skips it): fp32 adapter
  weights, fp32 gradients and AdamW's two fp32 moments = 16 bytes per adapter parameter.
  Full fine-tuning instead: the weights' gradients in their dtype and two fp32 moments.
* activations for `batch_size x seq_len` tokens with velotune's offloaded checkpointing (what the
  GPU holds while one decoder layer is recomputed and differentiated, the offloaded input restored
  and the next one prefetched, the fused loss's chunks):
      ACT_HIDDEN * hidden + ACT_INTERMEDIATE * intermediate   values of the compute dtype per token,
  calibrated on the measured 8B QLoRA long-context result (BENCHMARKS.md: 364,544 tokens trained at a
  78 GiB cap, 5% under the fitted limit, i.e. ~200 KB per token beyond the weights; the formula gives
  209 KB): it over-estimates slightly, so a refusal means the cheapest velotune setting does not fit.
  With `offload_every` = k, k - 1 more [tokens, hidden] inputs (memory/sparse_offload.py).
* host memory: the offloaded layer inputs (layers x hidden x dtype bytes per token; ceil(layers / k)
  of them with `offload_every` = k). Loading adds at most about one tensor of the checkpoint
  (transformers streams it: quant/loading.py; bench/load_memory.py measures it).

The estimate is an upper-bound style model, not a measurement; `bench/qlora.py --max-context`
measures the real limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from velotune.errors import ModelLoadError

# Per-token activation values (in units of the compute dtype) while one layer is recomputed and
# differentiated under offloaded checkpointing, per unit of hidden and of intermediate size.
ACT_HIDDEN = 15
ACT_INTERMEDIATE = 3
WORKSPACE_BYTES = 2**30  # cuBLAS workspace, attention kernels' scratch, allocator slack
NF4_BLOCK, NF4_BLOCK2 = 64, 256
GiB = 2**30


def nf4_bytes(numel: int) -> int:
    """Bytes of one NF4 double-quantised weight of `numel` elements (bitsandbytes' layout)."""
    blocks = -(-numel // NF4_BLOCK)
    return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_BLOCK2) + 4 + 256 * 4 + 16 * 4


@dataclass
class MemoryEstimate:
    """Bytes per item (see the module docstring); `gpu_bytes` / `host_bytes` are the totals."""

    tokens: int
    weights: int
    dequant_buffers: int
    trainable: int
    activations: int
    workspace: int
    host_offload: int
    per_token_gpu: int
    per_token_host: int
    quantised: bool
    n_params: int

    @property
    def fixed_gpu_bytes(self) -> int:
        return self.weights + self.dequant_buffers + self.trainable + self.workspace

    @property
    def gpu_bytes(self) -> int:
        return self.fixed_gpu_bytes + self.activations

    @property
    def host_bytes(self) -> int:
        return self.host_offload

    def max_tokens(self, cap_bytes: int) -> int:
        """Most tokens per step whose activations fit `cap_bytes` next to the fixed part (0: none)."""
        return max(0, (cap_bytes - self.fixed_gpu_bytes) // self.per_token_gpu)

    def describe(self) -> str:
        kind = "NF4" if self.quantised else "16-bit"
        return (
            f"~{self.gpu_bytes / GiB:.1f} GiB of GPU memory ({self.n_params / 1e9:.2f}B parameters: "
            f"weights {self.weights / GiB:.1f} GiB {kind}"
            + (f" + dequant buffers {self.dequant_buffers / GiB:.2f}" if self.dequant_buffers else "")
            + f", adapters+grads+AdamW {self.trainable / GiB:.2f}, activations {self.activations / GiB:.1f} "
            f"for {self.tokens} tokens, workspace {self.workspace / GiB:.1f}) and "
            f"~{self.host_offload / GiB:.1f} GiB of host memory for offloaded layer inputs"
        )


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate_memory(
    config,
    compute_dtype: torch.dtype = torch.bfloat16,
    load_in_4bit: bool = False,
    seq_len: int = 2048,
    batch_size: int = 1,
    lora_rank: int = 16,
    full_finetuning: bool = False,
    offload_every: int = 1,
) -> MemoryEstimate:
    """Training-memory estimate for `config`'s model (see the module docstring)."""
    if seq_len < 1 or batch_size < 1 or offload_every < 1 or lora_rank < 0:
        raise ValueError("seq_len, batch_size and offload_every must be >= 1 and lora_rank >= 0")
    db = torch.finfo(compute_dtype).bits // 8
    model = _meta_model(config)
    out_emb = model.get_output_embeddings()
    seen: set[int] = set()  # tied embeddings count once
    weights = n_params = largest = lora = 0
    for module in model.modules():
        # transformers' bitsandbytes loader quantises every linear but the output embedding
        linear = isinstance(module, torch.nn.Linear) and module is not out_emb
        quant = load_in_4bit and linear
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            n_params += n
            if quant and pname == "weight":
                weights += nf4_bytes(n)
                largest = max(largest, n)
            else:
                weights += n * db
        if linear and lora_rank:
            lora += lora_rank * (module.in_features + module.out_features)
    del model
    if full_finetuning:
        trainable = n_params * (db + 8)
    else:
        trainable = 16 * lora
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    layers = text.num_hidden_layers
    tokens = seq_len * batch_size
    # offload_every = k: up to k - 1 recomputed layer inputs wait on the device (memory/sparse_offload.py)
    per_token_gpu = db * (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * inter + (offload_every - 1) * hidden)
    per_token_host = db * hidden * math.ceil(layers / offload_every)
    return MemoryEstimate(
        tokens=tokens,
        weights=weights,
        dequant_buffers=2 * largest * db,
        trainable=trainable,
        activations=per_token_gpu * tokens,
        workspace=WORKSPACE_BYTES,
        host_offload=per_token_host * tokens,
        per_token_gpu=per_token_gpu,
        per_token_host=per_token_host,
        quantised=load_in_4bit,
        n_params=n_params,
    )


def parse_bytes(value) -> int:
    """`1234`, `"16GiB"`, `"16GB"`, `"512MiB"` -> bytes (ValueError otherwise)."""
    if isinstance(value, bool):
        raise ValueError(f"memory size {value!r}: give bytes or a string like '16GiB'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size {value!r} must be positive")
        return int(value)
    s = str(value).strip().upper().replace(" ", "")
    units = {
        "TIB": 2**40,
        "GIB": 2**30,
        "MIB": 2**20,
        "KIB": 2**10,
        "TB": 10**12,
        "GB": 10**9,
        "MB": 10**6,
        "KB": 10**3,
        "B": 1,
    }
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                n = float(s[: -len(unit)])
            except ValueError:
                break
            if n > 0:
                return int(n * mult)
    raise ValueError(f"memory size {value!r}: give bytes or a string like '16GiB'")


def check_fit(
    config,
    cap_bytes: int,
    compute_dtype: torch.dtype,
    load_in_4bit: bool,
    seq_len: int,
    full_finetuning: bool = False,
    batch_size: int = 1,
) -> MemoryEstimate:
    """The estimate, or ModelLoadError when it exceeds `cap_bytes`, naming what would fit: 4-bit
    loading, a shorter context (the most tokens that fit), or offloading the weights."""
    est = estimate_memory(config, compute_dtype, load_in_4bit, seq_len, batch_size, full_finetuning=full_finetuning)
    if est.gpu_bytes <= cap_bytes:
        return est
    options = []
    if not load_in_4bit and not full_finetuning:
        q = estimate_memory(config, compute_dtype, True, seq_len, batch_size)
        if q.gpu_bytes <= cap_bytes:
            options.append(f"QLoRA: load_in_4bit=True (~{q.gpu_bytes / GiB:.1f} GiB)")
        elif q.max_tokens(cap_bytes) >= 256:
            options.append(f"QLoRA (load_in_4bit=True) with max_seq_length <= {q.max_tokens(cap_bytes) // batch_size}")
    if full_finetuning:
        lora = estimate_memory(config, compute_dtype, load_in_4bit, seq_len, batch_size)
        if lora.gpu_bytes <= cap_bytes:
            options.append(f"LoRA instead of full fine-tuning (~{lora.gpu_bytes / GiB:.1f} GiB)")
    fit_tokens = est.max_tokens(cap_bytes)
    if fit_tokens >= 256:
        options.append(f"a shorter context: max_seq_length <= {fit_tokens // batch_size}")
    options.append("offloading the weights to host memory (device_map='auto', max_memory=...) or a larger card")
    raise ModelLoadError(
        f"this model does not fit: it needs {est.describe()}, but only {cap_bytes / GiB:.1f} GiB "
        f"of GPU memory is available. What would fit: {'; '.join(options)}"
    )


def gpu_cap_bytes(device: int | None = None) -> int | None:
    """Free memory on the current CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device if device is not None else torch.cuda.current_device())
    return int(free)
