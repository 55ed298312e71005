"""Causal-LM forward with the fused linear cross-entropy: the [N, vocab] logits never exist.

Contract (documented in docs/architecture.md):
  * labels given            -> loss through `fused_linear_cross_entropy`; `.logits` is None.
  * labels None, or `return_logits=True` passed to forward, or `model.velotune_return_logits = True`
                             -> the stock forward (full logits, transformers' own loss when labels).
  * `num_items_in_batch`    -> sum of token losses / num_items_in_batch (exact gradient accumulation,
                               as transformers' ForCausalLMLoss); `shift_labels` is honoured too.
Labels are shifted exactly as ForCausalLMLoss does: pad one -100 on the right, drop the first.
A padded batch runs padding-free (models/padding_free.py): the same loss and gradients from the real
tokens only, unless a padding position predicts a label (then stock's padded computation runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from velotune.models import padding_free as pf
from velotune.models.binding import role_of

# Bytes of logits one chunk of the fused linear cross-entropy may hold (its peak-memory share).
# 64 MiB = 261 rows of a 128k vocabulary in bf16: the chunk GEMMs stay large enough to run at speed
# (within the run-to-run spread of 256 MiB at 8B QLoRA, docs/perf-notes.md), and where the loss is
# the step's memory peak (CUDA-graphed layers, whose pool the loss cannot share) the peak is lower.
CE_MEMORY_BUDGET = 64 * 2**20


def resolve_lm_head(head: nn.Module) -> nn.Linear | None:
    """The plain Linear the LM head currently computes with (through PEFT's modules_to_save), or None."""
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):  # PEFT ModulesToSaveWrapper
        active = list(getattr(head, "active_adapters", []))
        adapters = getattr(head, "_adapters", head.modules_to_save.keys())
        if head.disable_adapters or not active or any(a not in adapters for a in active):
            head = head.original_module
        elif len(active) == 1:
            head = head.modules_to_save[active[0]]
        else:
            return None
    if type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks:
        return head
    return None


def _pads_predict_labels(shift_labels, attention_mask) -> bool:
    """Whether a padding position predicts a label (stock's loss then reads logits computed from
    padding, which a padding-free forward does not compute): one small device->host read."""
    if shift_labels.shape != attention_mask.shape:
        return True
    return bool(((shift_labels != -100) & (attention_mask.to(shift_labels.device) == 0)).any())


def causal_lm_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
):
    """Replacement for `<Family>ForCausalLM.forward`.

    A padded batch runs padding-free (models/padding_free.py) where the decoder stack allows it and
    no padding position predicts a label: the loss is then taken over the real tokens, with each
    sample's labels shifted inside the sample (the shifted labels are gathered at the real tokens),
    normalised as the padded batch would be (mean over the valid labels, or num_items_in_batch)."""
    return_logits = kwargs.pop("return_logits", False) or getattr(self, "velotune_return_logits", False)
    shift_labels = kwargs.get("shift_labels")
    head = resolve_lm_head(self.get_output_embeddings())
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    has_labels = labels is not None or shift_labels is not None
    if not has_labels or return_logits or head is None or cache is not None or kwargs.get("return_dict") is False:
        if has_labels and attention_mask is not None and _padding_free_may_run(self, attention_mask):
            shifted = shift_labels if shift_labels is not None else F.pad(labels, (0, 1), value=-100)[..., 1:]
            if _pads_predict_labels(shifted, attention_mask):
                kwargs[pf.ALLOW_KW] = False
        return self._velotune_stock_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    from velotune.kernels.fused_linear_ce import KeptRows, fused_linear_cross_entropy
    from velotune.models.positions import host_positions

    kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    kwargs["use_cache"] = False  # the decoder stack runs without a KV cache (the stock path took cached calls)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]  # token t predicts t + 1
    like = input_ids if input_ids is not None else inputs_embeds
    body = getattr(self, self.base_model_prefix)  # LlamaModel, GPTNeoXModel, ...
    packed = None
    if like is not None and pf.applies(body, kwargs):
        packed = pf.pack(like, attention_mask, position_ids)
        if packed is not None and attention_mask is not None and _pads_predict_labels(shift_labels, attention_mask):
            packed, kwargs[pf.ALLOW_KW] = None, False  # stock's padded loss, exactly
    shift_labels = shift_labels.reshape(-1).to(head.weight.device)
    if packed is not None:
        pf.record(body, packed)
        if not packed.keeps_layout:
            shift_labels = shift_labels.index_select(0, packed.index.to(shift_labels.device))
        kwargs = pf.drop_trl_varlen_keys(kwargs)
        kwargs[pf.VARLEN_KW] = packed.varlen
        input_ids, inputs_embeds = packed.gather(input_ids), packed.gather(inputs_embeds)
        attention_mask, position_ids = packed.marker(like.device), packed.position_ids
    # Ignored positions (prompt tokens, padding) are dropped before the lm_head matmuls; their count
    # is fetched now, while the decoder layers run, so reading it later does not stall the GPU.
    kept = KeptRows(shift_labels)
    if packed is None and self._velotune_spec.q_temperature is None:  # (else attention reads the ids)
        position_ids = host_positions(body, like, position_ids, attention_mask)
    outputs = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )
    hidden = outputs.last_hidden_state  # [B, T, H], or [1, N, H] packed
    shift_labels = shift_labels.to(hidden.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    spec = self._velotune_spec
    softcap = getattr(self.config, spec.final_softcap_attr, None) if spec.final_softcap_attr else None
    logit_scale = spec.logits_multiplier(self.config)  # Granite; the generic path's probe
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        shift_labels,
        bias=head.bias,
        softcap=softcap,
        logit_scale=logit_scale,
        ignore_index=-100,
        num_items_in_batch=num_items_in_batch,
        memory_budget_bytes=CE_MEMORY_BUDGET,
        kept_rows=kept.rows(),
    )
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def _padding_free_may_run(model, attention_mask) -> bool:
    """The decoder stack would run this call padding-free if nothing stopped it (cheap checks only)."""
    body = getattr(model, "model", None)
    return (
        body is not None
        and role_of(body) == "body"
        and body.__dict__.get("_velotune_padding_free", True)
        and torch.is_tensor(attention_mask)
        and attention_mask.dim() == 2
    )
