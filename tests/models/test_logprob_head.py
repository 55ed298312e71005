"""velotune's head behind TRL's `fused_lm_head=True` protocol (models/logprob_head.py), against TRL's own
`add_fused_lm_head` on the same model: outputs, loss, gradients; what stays TRL's; undo."""

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from mini import fixed_batch, save_mini_model
from velotune import FastLanguageModel
from velotune.kernels import fused_linear_logprob as flp
from velotune.models.logprob_head import bind_logprob_head, release_logprob_head, serves_logprob_head

_real = flp.fused_linear_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _call(model, batch, **kw):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :4] = -100  # a prompt: only the rest is scored
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, **kw)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite"])  # plain, softcapped, scaled logits
def test_served_calls_equal_trls_head(tmp_path, family, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(save_mini_model(family, tmp_path), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():  # non-zero B: every adapter matrix gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    base = model.get_base_model()
    add_fused_lm_head(base, temperature=0.7, outputs=("log_probs", "entropy"))
    batch = fixed_batch(batch=2, seq=12, pad_last=3)
    trl_forward = base.forward
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def run():
        model.zero_grad(set_to_none=True)
        out = _call(model, batch, fused_lm_head=True)
        (out.loss + 0.3 * out.entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    theirs, g_theirs = run()
    assert bind_logprob_head(base, temperature=0.7, outputs=("log_probs", "entropy"))
    calls = []
    monkeypatch.setattr(flp, "fused_linear_logprobs", lambda *a, **k: calls.append(1) or _real(*a, **k))
    ours, g_ours = run()
    assert calls == [1]
    for field in ("log_probs", "entropy", "loss"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert ((a - b).abs().max() / b.abs().max()) <= 1e-5, field
    assert torch.equal(ours.label_mask, theirs.label_mask) and ours.log_sum_sq_probs is None
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for n in g_ours:
        assert ((g_ours[n] - g_theirs[n]).abs().max() / g_theirs[n].abs().max()) <= 1e-5, n
    with torch.no_grad():  # not fused (generation, plain forwards): the wrapped forward, unchanged
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert calls == [1] and torch.equal(again, logits)
    assert release_logprob_head(base) and base.forward == trl_forward and not serves_logprob_head(base)


def test_trainable_head_and_unserved_requests_stay_trls(tmp_path, monkeypatch):
    model, _ = FastLanguageModel.from_pretrained(save_mini_model("llama", tmp_path), dtype=torch.float32)
    assert not bind_logprob_head(model, cast_lm_head_to_fp32=True)
    assert not bind_logprob_head(model, outputs=("log_probs", "is_top1"))
    add_fused_lm_head(model)
    assert bind_logprob_head(model)
    calls = []
    monkeypatch.setattr(flp, "fused_linear_logprobs", lambda *a, **k: calls.append(1) or _real(*a, **k))
    model.requires_grad_(True)  # full fine-tuning: lm_head's gradient is TRL's head's job
    out = _call(model, fixed_batch(batch=2, seq=12, pad_last=3), fused_lm_head=True)
    out.loss.backward()
    assert calls == [] and model.lm_head.weight.grad is not None
