"""Patching machinery: per-instance, revertible, reported; generation; RoPE scaling; unsupported models."""

import logging

import pytest
import torch
from mini import fixed_batch, mini_model, save_mini_model

from velotune import FastLanguageModel
from velotune.models import SPECS, prepare_model, report, spec_for, unpatch
from velotune.models.patch import is_patched


def test_every_family_has_a_spec_that_names_real_classes():
    import transformers

    for spec in SPECS:
        for cls in (spec.causal_lm, spec.attention, spec.mlp, spec.norm):
            assert hasattr(transformers.models, spec.name) or cls
        model = mini_model(spec.name)
        names = {type(m).__name__ for m in model.modules()}
        assert {spec.causal_lm, spec.attention, spec.mlp, spec.norm} <= names, spec.name
        assert spec_for(model.config) is spec and spec.activation(model.config) is not None


def test_patch_is_per_instance_and_unpatch_restores_stock(tmp_path):
    path = save_mini_model("llama", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128)
    other = mini_model("llama")  # same class, never patched
    assert not any(is_patched(m) for m in other.modules())
    attn = model.model.layers[0].self_attn
    assert "attention" in report(model) and "forward" in attn.__dict__  # bound on the instance...
    assert type(attn).forward is type(other.model.layers[0].self_attn).forward  # ...the class is untouched
    batch = fixed_batch()
    fused_loss = model(**batch).loss
    n = unpatch(model)
    assert n == 1 + 1 + 2 + 2 + 5 and "stock" in report(model)  # causal LM, body (padding-free), attn, mlp, norms
    assert not any("forward" in m.__dict__ for m in model.modules())
    stock_loss = model(**batch).loss
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-5, atol=0)
    assert model(**batch).logits is not None  # stock forward returns logits again


def test_logits_returned_when_asked(tmp_path):
    path = save_mini_model("gemma2", tmp_path)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128)
    batch = fixed_batch()
    fused = model(**batch)
    assert fused.logits is None and fused.loss is not None
    full = model(**batch, return_logits=True)
    assert full.logits.shape == (2, 12, 384)
    torch.testing.assert_close(full.loss, fused.loss, rtol=1e-5, atol=0)
    no_labels = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(no_labels.logits, full.logits)
    assert full.logits.abs().max() <= 30.0  # final-logit softcap applied


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_matches_stock(family, tmp_path):
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = save_mini_model(family, tmp_path)
    fast, tok = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128)
    fast = FastLanguageModel.get_peft_model(fast, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p in fast.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    stock = get_peft_model(stock, copy.deepcopy(fast.peft_config["default"]))
    stock.load_state_dict(fast.state_dict())
    fast.eval(), stock.eval()
    ids = fixed_batch(batch=1, seq=6, pad_last=0)["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out_fast = fast.generate(input_ids=ids, **kw)
    out_stock = stock.generate(input_ids=ids, **kw)
    assert torch.equal(out_fast, out_stock)


def test_rope_scaled_beyond_native_context_when_asked(tmp_path):
    path = save_mini_model("mistral", tmp_path)  # max_position_embeddings 256, default RoPE
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=1024, rope_scaling="linear")
    rp = model.config.rope_parameters
    assert rp["rope_type"] == "linear" and rp["factor"] == pytest.approx(4.0)
    native, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, native.model.rotary_emb.inv_freq / 4)
    unpatch(model)
    assert model.config.max_position_embeddings == 256 and model.config.rope_parameters["rope_type"] == "default"


def test_architecture_without_family_takes_the_generic_path(caplog):
    """GPT-2 has no family file: one line says which generic pieces are fast (models/generic.py;
    tests/models/test_generic.py covers the pieces); its Conv1D projections and LayerNorms stay stock."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64))
    with caplog.at_level(logging.WARNING, logger="velotune"):
        assert prepare_model(model, max_seq_length=32) is True
    lines = [r.getMessage() for r in caplog.records if r.name == "velotune"]
    assert len(lines) == 1 and "GPT2LMHeadModel" in lines[0] and "no family file" in lines[0]
    assert "fast: lm_head fused linear cross-entropy" in lines[0] and "stock: norm LayerNorm" in lines[0]
    assert [type(m).__name__ for m in model.modules() if is_patched(m)] == ["GPT2LMHeadModel"]


def test_training_loss_drops_ignored_rows_before_the_lm_head(monkeypatch):
    """The causal-LM forward feeds only the positions with a label to the lm_head matmuls (prompt and
    padding tokens are dropped, found by KeptRows without a blocking sync), and the loss and gradients
    equal the stock model's."""
    import velotune.kernels.fused_linear_ce as fl

    batch = fixed_batch()
    batch["labels"][:, :5] = -100  # a masked prompt
    stock = mini_model("llama")
    want = stock(**batch).loss
    want.backward()
    model = mini_model("llama")
    prepare_model(model, max_seq_length=64)
    seen = []
    real = fl._chunk_loss_and_grad
    monkeypatch.setattr(
        fl, "_chunk_loss_and_grad", lambda logits, *a, **k: seen.append(len(logits)) or real(logits, *a, **k)
    )
    loss = model(**batch).loss
    loss.backward()
    n_kept = int((batch["labels"][:, 1:] != -100).sum())  # shifted: the last position of each row predicts nothing
    assert sum(seen) == n_kept < batch["labels"].numel()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), stock.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_to_another_dtype_runs_the_stock_path(tmp_path, monkeypatch):
    """A float32 model under bf16 autocast (TRL's default bf16=True) runs transformers + PEFT's own
    path, with a warning: the same loss and LoRA gradients as the unpatched model, where the fused
    functions would mix the two dtypes. A bf16 model under bf16 autocast stays fused."""
    import importlib

    patch_mod = importlib.import_module("velotune.models.patch")  # (velotune.models.patch is also a function)
    monkeypatch.setattr(patch_mod, "_WARNED_AUTOCAST", [False])
    path = save_mini_model("llama", tmp_path)
    batch = fixed_batch()

    def lora(dtype):
        model, _ = FastLanguageModel.from_pretrained(path, dtype=dtype, max_seq_length=128)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        return model

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ours = lora(torch.float32)
    with pytest.warns(UserWarning, match="autocast to another dtype"):
        got = run(ours)
    stock = lora(torch.float32)
    unpatch(stock.base_model.model)
    want = run(stock)
    assert torch.equal(got[0], want[0]) and got[1].keys() == want[1].keys()
    assert all(torch.equal(got[1][n], want[1][n]) for n in want[1])

    calls = []
    real = patch_mod.FUSED_FORWARDS["mlp"]
    monkeypatch.setitem(patch_mod.FUSED_FORWARDS, "mlp", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(
        patch_mod,
        "BOUND_FORWARDS",
        {r: patch_mod._stock_under_foreign_autocast(f, r) for r, f in patch_mod.FUSED_FORWARDS.items()},
    )
    bf16 = lora(torch.bfloat16)
    run(bf16)
    assert calls  # fused under autocast to its own dtype
