"""GGUF layout: architecture, metadata keys and the tensor transforms llama.cpp expects.

Mirrors llama.cpp's convert_hf_to_gguf.py (base.py's TextModel.set_gguf_parameters and each model
class). What differs per family is data in the family's spec (models/<family>.py, `FamilySpec.gguf`):
the GGUF architecture, whether q/k rows are permuted to llama.cpp's interleaved RoPE pairs, and the
names of the FEATURES below that its architecture needs. Norm weights are stored as offset + w for
Gemma-style norms (`FamilySpec.norm_offset`). This module keeps no list of families.

Tensor names come from the gguf package's own HF->GGUF table (gguf.get_tensor_name_map).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator

import gguf
import numpy as np
import torch

from velotune.export.atomic import ExportError
from velotune.models.families import SPECS, spec_for
from velotune.models.spec import FamilySpec

log = logging.getLogger("velotune")


def family_of(config) -> FamilySpec:
    """The family spec of `config`, which must have a GGUF layout (else a one-line ExportError)."""
    spec = spec_for(config)
    if spec is None or spec.gguf is None:
        known = ", ".join(s.name for s in SPECS if s.gguf is not None)
        raise ExportError(
            f"GGUF export supports {known}; this model is {config.model_type!r} "
            "(save merged safetensors and convert with llama.cpp's convert_hf_to_gguf.py)"
        )
    return spec


def arch_of(family: FamilySpec) -> gguf.MODEL_ARCH:
    return gguf.MODEL_ARCH[family.gguf.arch]


def permute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """[n_head * head_dim, ...]: per head, reorder rows (x0..x_{d/2-1}, y0..y_{d/2-1}) -> (x0, y0, x1, y1, ...).

    HF Llama rotates pairs (i, i + d/2) (rotate_half); llama.cpp's LLAMA rope rotates (2i, 2i+1).
    Permuting the rows of W_q / W_k turns one into the other (convert_hf_to_gguf LlamaModel.permute).
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config) -> dict:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rp = dict(rp.get("full_attention", rp))
    if "rope_theta" not in rp and getattr(config, "rope_theta", None) is not None:
        rp["rope_theta"] = config.rope_theta
    return rp


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_metadata(w: gguf.GGUFWriter, config, family: FamilySpec, file_type: int) -> None:
    """Hyper-parameters in the keys llama.cpp reads for this architecture."""
    c, rp = config, _rope(config)
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
    elif rope_type not in ("default", "llama3") and not (
        "longrope_factors" in family.gguf.features and rope_type in ("longrope", "su")
    ):
        raise ExportError(f"rope_type {rope_type!r} has no GGUF equivalent in velotune's exporter")
    if getattr(c, "head_dim", None) is not None:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    for feature in family.gguf.features:
        FEATURES[feature].metadata(w, c, rp)
    w.add_file_type(file_type)


def _warn_no_swa(w, c, rp) -> None:
    window = getattr(c, "sliding_window", None)
    if window and window < c.max_position_embeddings:
        log.warning(
            "llama.cpp runs %s without a sliding window: outputs differ from transformers beyond %d tokens of context",
            c.model_type,
            window,
        )


def _partial_rope_dims(w, c, rp) -> None:
    w.add_rope_dimension_count(int(rp.get("partial_rotary_factor", 1.0) * c.hidden_size) // c.num_attention_heads)


def _check_gemma2(w, c, rp) -> None:
    """llama.cpp hard-codes Gemma 2's attention scale and SWA layout: refuse configs it would misread."""
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 46 else c.head_dim
    if c.query_pre_attn_scalar != expected:
        raise ExportError(
            f"Gemma 2 with query_pre_attn_scalar={c.query_pre_attn_scalar} cannot be expressed in "
            f"GGUF (llama.cpp uses {expected} for a {c.num_hidden_layers}-layer model)"
        )
    types = getattr(c, "layer_types", None)
    if types and any((t == "sliding_attention") != (i % 2 == 0) for i, t in enumerate(types)):
        raise ExportError("Gemma 2 GGUF needs sliding attention on even layers and full attention on odd ones")


def _check_gemma3(w, c, rp) -> None:
    """llama.cpp's Gemma 3 graph hard-codes what Gemma 3 checkpoints use: every 6th layer global, the
    others sliding with RoPE base 10000 unscaled, the attention scale from head_dim (hidden / heads for
    the 62-layer 27B), no final-logit softcap. Refuse configs it would misread."""
    types = getattr(c, "layer_types", None) or []
    if any((t == "sliding_attention") != bool((i + 1) % 6) for i, t in enumerate(types)):
        raise ExportError(
            "Gemma 3 GGUF needs 5 sliding layers then 1 full-attention layer, repeated (llama.cpp's fixed pattern)"
        )
    local = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
        raise ExportError(
            "Gemma 3 GGUF needs the sliding layers' RoPE at base 10000 without scaling "
            f"(llama.cpp's fixed values); this model has {local}"
        )
    expected = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == 62 else c.head_dim
    if c.query_pre_attn_scalar != expected:
        raise ExportError(
            f"Gemma 3 with query_pre_attn_scalar={c.query_pre_attn_scalar} cannot be expressed in "
            f"GGUF (llama.cpp uses {expected} for a {c.num_hidden_layers}-layer model)"
        )
    if getattr(c, "final_logit_softcapping", None) is not None:
        raise ExportError("Gemma 3 GGUF: llama.cpp's Gemma 3 graph has no final-logit softcap")


def _check_smollm3(w, c, rp) -> None:
    """llama.cpp's SmolLM3 graph skips RoPE on layers i with (i + 1) % 4 == 0 (a constant, not a GGUF key)
    and has no sliding window: refuse configs it would run differently."""
    want = [int((i + 1) % 4 != 0) for i in range(c.num_hidden_layers)]
    if list(c.no_rope_layers) != want:
        raise ExportError(
            f"SmolLM3 GGUF needs NoPE on every 4th layer (llama.cpp hard-codes it); this model's "
            f"no_rope_layers is {list(c.no_rope_layers)}"
        )
    if getattr(c, "use_sliding_window", False) and "sliding_attention" in (getattr(c, "layer_types", None) or ()):
        raise ExportError("SmolLM3 GGUF: llama.cpp's SmolLM3 graph has no sliding window")


def _sliding_window_pattern(w, c, rp) -> None:
    """The window and which layers use it, one bool per layer from config.layer_types (the
    `attention.sliding_window_pattern` array); without the array llama.cpp assumes its own fixed pattern."""
    window = getattr(c, "sliding_window", None) or 0
    w.add_sliding_window(window)
    if window:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])


def _check_olmo3_rope(w, c, rp) -> None:
    """llama.cpp runs OLMo 3 as olmo2 with one RoPE base (the full-attention layers') for every layer,
    the sliding layers unscaled, and YaRN's attention factor derived from the factor (0.1 ln f + 1).
    Refuse configs it would run differently."""
    local = (getattr(c, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default" or local.get("rope_theta") != rp.get("rope_theta"):
        raise ExportError(
            "OLMo 3 GGUF needs the sliding layers' RoPE unscaled at the full-attention layers' base "
            f"{rp.get('rope_theta')} (llama.cpp has one base); this model has {local}"
        )
    attention = rp.get("attention_factor")
    if rp.get("rope_type") == "yarn" and attention is not None:
        derived = 0.1 * math.log(rp["factor"]) + 1
        if not math.isclose(attention, derived, rel_tol=1e-6):
            raise ExportError(
                f"OLMo 3 GGUF: llama.cpp derives YaRN's attention factor from the factor ({derived:.6g}); "
                f"this model has attention_factor={attention}"
            )


def _ministral3_temperature(w, c, rp) -> None:
    """Ministral 3 (convert_hf_to_gguf's Ministral3Model): llama.cpp's mistral3 graph multiplies q by the
    attention temperature with beta from attention.temperature_scale and the period taken from the YaRN
    original context, and YaRN's attention factor from yarn_log_multiplier (= mscale_all_dim, with mscale
    taken as 1). Refuse what it would run differently."""
    if rp.get("rope_type") != "yarn":
        raise ExportError(
            "Ministral 3 GGUF needs YaRN RoPE (llama.cpp takes the attention temperature's period from "
            f"YaRN's original context); this model has rope_type {rp.get('rope_type')!r}"
        )
    if rp.get("llama_4_scaling_beta") is None:
        raise ExportError("Ministral 3 GGUF: rope_parameters has no llama_4_scaling_beta (the attention temperature)")
    mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
    if rp.get("attention_factor") is not None or (mscale and mscale_all_dim and float(mscale) != 1.0):
        raise ExportError(
            "Ministral 3 GGUF: llama.cpp's mistral3 graph derives YaRN's attention factor assuming mscale 1; "
            f"this model has mscale={mscale}, attention_factor={rp.get('attention_factor')}"
        )
    if mscale and mscale_all_dim:  # transformers: factor get_mscale(f, 1) / get_mscale(f, mscale_all_dim)
        w.add_rope_scaling_yarn_log_mul(float(mscale_all_dim))
    for key, add in (
        ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
    ):
        if rp.get(key) is not None:
            add(float(rp[key]))
    w.add_attn_temperature_scale(float(rp["llama_4_scaling_beta"]))


def _granite_scales(w, c, rp) -> None:
    """Granite's four scalars (convert_hf_to_gguf's GraniteModel); llama.cpp divides the logits by logit_scale."""
    w.add_embedding_scale(c.embedding_multiplier)
    w.add_residual_scale(c.residual_multiplier)
    w.add_attention_scale(c.attention_multiplier)
    w.add_logit_scale(c.logits_scaling)


def _softcaps(w, c, rp) -> None:
    w.add_attn_logit_softcapping(c.attn_logit_softcapping or 0.0)
    w.add_final_logit_softcapping(c.final_logit_softcapping or 0.0)


def _llama3_rope_freqs(c, rp) -> Iterator[tuple[str, np.ndarray]]:
    """Llama 3 rope frequency factors: llama.cpp reads them as a tensor; transformers computes them."""
    if rp.get("rope_type") != "llama3":
        return
    dim, base = head_dim(c), rp.get("rope_theta", 10000.0)
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


def _longrope_factors(c, rp) -> Iterator[tuple[str, np.ndarray]]:
    if rp.get("long_factor"):
        rs = gguf.TENSOR_NAMES
        yield rs[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(rp["long_factor"], dtype=np.float32)
        yield rs[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.asarray(rp["short_factor"], dtype=np.float32)


def _nothing(*_args) -> None:
    return None


class Feature:
    """One named piece of an architecture's GGUF layout: metadata(writer, config, rope) writes keys;
    tensors(config, rope) yields extra (name, array) pairs; drop(name) skips an HF tensor."""

    def __init__(
        self, metadata: Callable = _nothing, tensors: Callable | None = None, drop: Callable[[str], bool] | None = None
    ):
        self.metadata, self.tensors, self.drop = metadata, tensors, drop


FEATURES: dict[str, Feature] = {
    "vocab_size": Feature(lambda w, c, rp: w.add_vocab_size(c.vocab_size)),
    "rope_dims": Feature(lambda w, c, rp: w.add_rope_dimension_count(head_dim(c))),
    "no_swa_warning": Feature(_warn_no_swa),  # the architecture's graph has no sliding window
    "partial_rope_dims": Feature(_partial_rope_dims),
    "orig_ctx": Feature(
        lambda w, c, rp: w.add_rope_scaling_orig_ctx_len(
            getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings
        )
    ),
    "sliding_window_key": Feature(lambda w, c, rp: w.add_sliding_window(getattr(c, "sliding_window", None) or 0)),
    "sliding_window_pattern": Feature(_sliding_window_pattern),  # the window + config.layer_types as an array
    "gemma2_layout": Feature(_check_gemma2),
    "gemma3_layout": Feature(_check_gemma3),
    "smollm3_layout": Feature(_check_smollm3),  # NoPE every 4th layer, no sliding window
    "olmo3_rope": Feature(_check_olmo3_rope),  # one RoPE base, unscaled sliding layers
    "granite_scales": Feature(_granite_scales),
    "ministral3_temperature": Feature(_ministral3_temperature),  # YaRN + Llama 4-style query temperature
    "softcaps": Feature(_softcaps),
    "llama3_rope_freqs": Feature(tensors=_llama3_rope_freqs),
    "longrope_factors": Feature(tensors=_longrope_factors),
    "tied_output": Feature(drop=lambda name: name == "lm_head.weight"),  # output = token_embd in llama.cpp
}


def extra_tensors(config, family: FamilySpec) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors llama.cpp needs that transformers computes on the fly (e.g. Llama 3 rope factors)."""
    rp = _rope(config)
    for feature in family.gguf.features:
        if FEATURES[feature].tensors is not None:
            yield from FEATURES[feature].tensors(config, rp)


def gguf_tensors(
    config, family: FamilySpec, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, np.ndarray]]:
    """HF `(name, tensor)` -> GGUF `(name, float32 array)` with permutations and norm offsets applied."""
    tmap = gguf.get_tensor_name_map(arch_of(family), config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    drops = [FEATURES[f].drop for f in family.gguf.features if FEATURES[f].drop is not None]
    yield from extra_tensors(config, family)
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq") or any(drop(name) for drop in drops):
            continue
        t = t.float()
        if family.gguf.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_rotary(t, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_rotary(t, n_kv)
        if family.norm_offset and name.endswith("norm.weight"):
            t = t + family.norm_offset
        new_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"no GGUF name for tensor {name!r} of a {config.model_type} model")
        yield new_name, t.numpy()
