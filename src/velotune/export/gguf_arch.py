"""Per-family GGUF layout: architecture, metadata keys and the tensor transforms llama.cpp expects.

Mirrors llama.cpp's convert_hf_to_gguf.py (conversion/{llama,qwen,phi,gemma}.py and base.py's
TextModel.set_gguf_parameters) for the five families velotune trains:

    family   GGUF arch  Q/K permute  extra
    llama    llama      yes          rope_freqs tensor for rope_type "llama3"
    mistral  llama      yes          (llama.cpp's llama graph has no sliding window: warned)
    qwen2    qwen2      no           q/k/v biases
    phi3     phi3       no           fused attn_qkv and ffn_up (gate|up) kept fused
    gemma2   gemma2     no           every *norm.weight stored as 1 + w; softcaps; SWA every 2nd layer
    granite  granite    yes          embedding, residual, attention and logit scales (conversion/granite.py)
    smollm3  smollm3    yes          NoPE every 4th layer: hard-coded in llama.cpp (no GGUF key), so checked
    olmo2    olmo2      no           q/k norms, post-attention / post-feed-forward norms (tensors only)

Tensor names come from the gguf package's own HF->GGUF table (gguf.get_tensor_name_map).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import gguf
import numpy as np
import torch

from velotune.export.atomic import ExportError

log = logging.getLogger("velotune")


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False     # rotate-half (HF) -> interleaved pairs (llama.cpp's "normal" rope)
    norm_plus_one: bool = False  # Gemma RMSNorm multiplies by (1 + w)


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2),
    "phi3": Family(gguf.MODEL_ARCH.PHI3),
    "gemma2": Family(gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True),
    "granite": Family(gguf.MODEL_ARCH.GRANITE, permute_qk=True),
    "smollm3": Family(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True),
    "olmo2": Family(gguf.MODEL_ARCH.OLMO2),
}


def family_of(config) -> Family:
    fam = FAMILIES.get(getattr(config, "model_type", None))
    if fam is None:
        raise ExportError(f"GGUF export supports {', '.join(FAMILIES)}; this model is {config.model_type!r} "
                          "(save merged safetensors and convert with llama.cpp's convert_hf_to_gguf.py)")
    return fam


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """[n_head * head_dim, ...]: per head, reorder rows (x0..x_{d/2-1}, y0..y_{d/2-1}) -> (x0, y0, x1, y1, ...).

    HF Llama rotates pairs (i, i + d/2) (rotate_half); llama.cpp's LLAMA rope rotates (2i, 2i+1).
    Permuting the rows of W_q / W_k turns one into the other (convert_hf_to_gguf LlamaModel.permute).
    """
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


def _rope(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rp = dict(rp.get("full_attention", rp))
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    return rp


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_metadata(w: gguf.GGUFWriter, config, family: Family, file_type: int) -> None:
    """Hyper-parameters in the keys llama.cpp reads for this architecture."""
    c, rp = config, _rope(config)
    name = getattr(c, "model_type")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rp["rope_theta"]))
    rope_type = rp.get("rope_type", "default")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    elif rope_type not in ("default", "llama3") and not (name == "phi3" and rope_type in ("longrope", "su")):
        raise ExportError(f"rope_type {rope_type!r} has no GGUF equivalent in velotune's exporter")
    if getattr(c, "head_dim", None) is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    if family.arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.GRANITE, gguf.MODEL_ARCH.SMOLLM3):
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim(c))
        window = getattr(c, "sliding_window", None)
        if window and window < c.max_position_embeddings:
            log.warning("llama.cpp runs %s without a sliding window: outputs differ from transformers beyond "
                        "%d tokens of context", name, window)
    if family.arch == gguf.MODEL_ARCH.GRANITE:  # llama.cpp divides the logits by its logit_scale
        w.add_embedding_scale(c.embedding_multiplier)
        w.add_residual_scale(c.residual_multiplier)
        w.add_attention_scale(c.attention_multiplier)
        w.add_logit_scale(c.logits_scaling)
    elif family.arch == gguf.MODEL_ARCH.SMOLLM3:
        _check_smollm3(c)
    elif family.arch == gguf.MODEL_ARCH.PHI3:
        w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads)
        w.add_rope_scaling_orig_ctx_len(getattr(c, "original_max_position_embeddings", None)
                                        or c.max_position_embeddings)
        w.add_sliding_window(getattr(c, "sliding_window", None) or 0)  # llama.cpp ignores Phi-3 SWA
    elif family.arch == gguf.MODEL_ARCH.GEMMA2:
        _check_gemma2(c)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping or 0.0)
        w.add_final_logit_softcapping(c.final_logit_softcapping or 0.0)
        w.add_sliding_window(c.sliding_window)
    w.add_file_type(file_type)


def _check_gemma2(c) -> None:
    """llama.cpp hard-codes Gemma 2's attention scale and SWA layout: refuse configs it would misread."""
    expected = (c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 46 else c.head_dim)
    if c.query_pre_attn_scalar != expected:
        raise ExportError(f"Gemma 2 with query_pre_attn_scalar={c.query_pre_attn_scalar} cannot be expressed in "
                          f"GGUF (llama.cpp uses {expected} for a {c.num_hidden_layers}-layer model)")
    types = getattr(c, "layer_types", None)
    if types and any((t == "sliding_attention") != (i % 2 == 0) for i, t in enumerate(types)):
        raise ExportError("Gemma 2 GGUF needs sliding attention on even layers and full attention on odd ones")


def _check_smollm3(c) -> None:
    """llama.cpp's SmolLM3 graph skips RoPE on layers i with (i + 1) % 4 == 0 (a constant, not a GGUF key)
    and has no sliding window: refuse configs it would run differently."""
    want = [int((i + 1) % 4 != 0) for i in range(c.num_hidden_layers)]
    if list(c.no_rope_layers) != want:
        raise ExportError(f"SmolLM3 GGUF needs NoPE on every 4th layer (llama.cpp hard-codes it); this model's "
                          f"no_rope_layers is {list(c.no_rope_layers)}")
    if getattr(c, "use_sliding_window", False) and "sliding_attention" in (getattr(c, "layer_types", None) or ()):
        raise ExportError("SmolLM3 GGUF: llama.cpp's SmolLM3 graph has no sliding window")


def extra_tensors(config, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that transformers computes on the fly (Llama 3 rope frequency factors)."""
    rp = _rope(config)
    if family.arch == gguf.MODEL_ARCH.LLAMA and rp.get("rope_type") == "llama3":
        dim, base = head_dim(config), rp.get("rope_theta", 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
        old_ctx = rp.get("original_max_position_embeddings", 8192)
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        factors = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < hi_wavelen:
                factors.append(1.0)
            elif wavelen > lo_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.asarray(factors, dtype=np.float32)
    if family.arch == gguf.MODEL_ARCH.PHI3 and rp.get("long_factor"):
        rs = gguf.TENSOR_NAMES
        yield rs[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(rp["long_factor"], dtype=np.float32)
        yield rs[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(rp["short_factor"], dtype=np.float32)


def gguf_tensors(config, family: Family, tensors: Iterable[tuple[str, torch.Tensor]]
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """HF `(name, tensor)` -> GGUF `(name, float32 array)` with permutations and norm offsets applied."""
    tmap = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    yield from extra_tensors(config, family)
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if family.arch == gguf.MODEL_ARCH.GEMMA2 and name == "lm_head.weight":
            continue  # tied to token_embd in llama.cpp's Gemma 2 graph
        t = t.float()
        if family.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_rotary(t, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_rotary(t, n_kv)
        if family.norm_plus_one and name.endswith("norm.weight"):
            t = t + 1
        new_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"no GGUF name for tensor {name!r} of a {config.model_type} model")
        yield new_name, t.numpy()
