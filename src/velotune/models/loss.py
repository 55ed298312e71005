"""Causal-LM forward with the fused linear cross-entropy: the [N, vocab] logits never exist.

Contract (documented in docs/architecture.md):
  * labels given            -> loss through `fused_linear_cross_entropy`; `.logits` is None.
  * labels None, or `return_logits=True` passed to forward, or `model.velotune_return_logits = True`
                             -> the stock forward (full logits, transformers' own loss when labels).
  * `num_items_in_batch`    -> sum of token losses / num_items_in_batch (exact gradient accumulation,
                               as transformers' ForCausalLMLoss); `shift_labels` is honoured too.
Labels are shifted exactly as ForCausalLMLoss does: pad one -100 on the right, drop the first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

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


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                      labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """Replacement for `<Family>ForCausalLM.forward`."""
    return_logits = kwargs.pop("return_logits", False) or getattr(self, "velotune_return_logits", False)
    shift_labels = kwargs.get("shift_labels")
    head = resolve_lm_head(self.lm_head)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (labels is None and shift_labels is None) or return_logits or head is None or cache is not None \
            or kwargs.get("return_dict") is False:
        return self._velotune_stock_forward(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from velotune.kernels.fused_linear_ce import KeptRows, fused_linear_cross_entropy
    from velotune.models.positions import host_positions

    kwargs.pop("shift_labels", None)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("return_dict", None)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]        # token t predicts t + 1
    shift_labels = shift_labels.reshape(-1).to(head.weight.device)
    # Ignored positions (prompt tokens, padding) are dropped before the lm_head matmuls; their count
    # is fetched now, while the decoder layers run, so reading it later does not stall the GPU.
    kept = KeptRows(shift_labels)
    position_ids = host_positions(self.model, input_ids if input_ids is not None else inputs_embeds, position_ids,
                                  attention_mask)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = outputs.last_hidden_state                                   # [B, T, H]
    shift_labels = shift_labels.to(hidden.device)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    spec = self._velotune_spec
    softcap = getattr(self.config, spec.final_softcap_attr, None) if spec.final_softcap_attr else None
    loss = fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels,
                                      bias=head.bias, softcap=softcap, ignore_index=-100,
                                      num_items_in_batch=num_items_in_batch, memory_budget_bytes=CE_MEMORY_BUDGET,
                                      kept_rows=kept.rows())
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)
