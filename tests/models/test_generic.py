"""The generic fast path (models/generic.py) on models without a family file, against stock
transformers + PEFT: GPT-NeoX (Pythia-shaped: LayerNorms, fused query_key_value, partial rotary,
parallel residual) and Cohere (parallel block, mean-centred LayerNorm the RMSNorm probe must reject,
logits multiplied by logit_scale, which the fused CE folds in); Mixtral for mixture-of-experts (stock
experts, fast everything else). Same bars as the family parity tests: fp32, 1e-5, against float64 stock.
"""

import copy
import logging

import pytest
import torch
from mini import VOCAB, fixed_batch, mini_tokenizer
from test_parity import TOL, _assert_same_training, _held_out, _rel, _train_pair, _trainable

from velotune import FastLanguageModel
from velotune.models import report, unpatch
from velotune.models.generic import generic_plan, probe_lora, probe_norm
from velotune.models.patch import is_patched

_SIZE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
TARGETS = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "cohere": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def generic_config(kind: str, **overrides):
    import transformers as tf

    kw = dict(_SIZE)
    if kind == "gpt_neox":  # Pythia: partial rotary, parallel residual, biases everywhere
        cls = tf.GPTNeoXConfig
        kw.update(rotary_pct=0.5, use_parallel_residual=True)
    elif kind == "cohere":  # Command-R: GQA, logit_scale, mean-centred LayerNorm, tied embeddings
        cls = tf.CohereConfig
        kw.update(num_key_value_heads=2, logit_scale=0.0625, tie_word_embeddings=True)
    elif kind == "mixtral":  # MoE: 4 experts, top 2, GQA, sliding window off
        cls = tf.MixtralConfig
        kw.update(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    else:
        raise ValueError(kind)
    kw.update(overrides)
    return cls(**kw)


def save_generic(kind, folder, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = folder / kind
    model.save_pretrained(path)
    mini_tokenizer().save_pretrained(path)
    return path


def _pair(kind, tmp_path, *, lora=True, seed=1, overrides=None, **peft_kw):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = save_generic(kind, tmp_path, **(overrides or {}))
    fast, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128)
    # float64 reference: torch's grouped_mm (transformers' default experts kernel) has no float64
    kw = {"experts_implementation": "eager"} if kind == "mixtral" else {}
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    if lora:
        peft_kw.setdefault("use_gradient_checkpointing", False)
        fast = FastLanguageModel.get_peft_model(fast, r=8, lora_alpha=16, target_modules=TARGETS[kind], **peft_kw)
        stock = get_peft_model(stock, copy.deepcopy(fast.peft_config["default"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in stock.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        assert not fast.load_state_dict(stock.state_dict(), strict=False).unexpected_keys
    return fast, stock.to(torch.float64)


@pytest.mark.parametrize(
    "kind,want",
    [
        (
            "gpt_neox",
            [
                "lm_head    fast  fused linear cross-entropy",
                "norm       stock LayerNorm",
                "lora       8 layer(s) fused, 0 on the stock PEFT path",
            ],
        ),
        (
            "cohere",
            [
                "lm_head    fast  fused linear cross-entropy (logits x 0.0625 folded in)",
                "norm       stock CohereLayerNorm (not an RMSNorm",
                "lora       14 layer(s) fused, 0 on",
            ],
        ),
    ],
)
def test_generic_lora_training_matches_stock(kind, want, tmp_path):
    fast, stock = _pair(kind, tmp_path)
    text = report(fast)
    for line in want:
        assert line in text, text
    base = fast.get_base_model()
    assert base.forward.__func__.__name__ == "causal_lm_forward"
    assert base.get_output_embeddings().weight.shape[0] == VOCAB
    _assert_same_training(_train_pair(fast, stock, 5, [fixed_batch()]))
    with torch.no_grad():
        assert _rel(fast(**_held_out()).logits, stock(**_held_out()).logits) <= TOL


def test_generic_loss_is_fused_and_logits_never_made(tmp_path):
    fast, _ = _pair("cohere", tmp_path)
    out = fast(**fixed_batch())
    assert out.logits is None and out.loss is not None


def test_generic_offloaded_checkpointing_matches_stock(tmp_path):
    fast, stock = _pair("gpt_neox", tmp_path, use_gradient_checkpointing="unsloth")
    fast.train()
    assert "checkpointing: offloaded, 2 decoder layer(s)" in report(fast)
    _assert_same_training(_train_pair(fast, stock, 3, [fixed_batch()]))
    assert fast.velotune_offload_stats.packed >= 2 * 3 and fast.velotune_offload_stats.unpacked >= 2 * 3


def test_moe_trains_on_generic_path_with_stock_experts(tmp_path):
    fast, stock = _pair("mixtral", tmp_path)
    text = report(fast)
    assert "norm       fast  MixtralRMSNorm (x5, offset 0" in text, text
    assert "experts  stock (2 MoE block(s)" in text and "lm_head    fast" in text
    assert "lora       8 layer(s) fused" in text
    _assert_same_training(_train_pair(fast, stock, 5, [fixed_batch()]))


def test_head_probe_fails_on_an_auxiliary_loss(tmp_path, caplog):
    """Mixtral with its router loss on: stock's loss is CE + coef * aux, which the fused CE does not
    compute, so the probe leaves the head stock; training still equals stock."""
    with caplog.at_level(logging.WARNING, logger="velotune"):
        fast, stock = _pair("mixtral", tmp_path, overrides=dict(output_router_logits=True, router_aux_loss_coef=0.5))
    assert "lm_head    stock cross-entropy (the loss is not the shifted cross-entropy" in report(fast)
    lines = [r.getMessage() for r in caplog.records if "no family file" in r.getMessage()]
    assert len(lines) == 1 and "stock: lm_head" in lines[0] and "fast: norm MixtralRMSNorm" in lines[0]
    _assert_same_training(_train_pair(fast, stock, 2, [fixed_batch()]))


class _Bf16RMSNorm(torch.nn.Module):
    """An RMSNorm computed in the input's dtype throughout (no fp32 upcast): same math, other rounding."""

    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def test_norm_probe_accepts_rmsnorm_conventions_and_rejects_others():
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    assert probe_norm(LlamaRMSNorm(32)) == ((0.0, False), "offset 0, variance_epsilon")
    assert probe_norm(Gemma2RMSNorm(32)) == ((1.0, False), "offset 1, eps")
    assert probe_norm(CohereLayerNorm(32))[0] is None
    assert probe_norm(torch.nn.LayerNorm(32)) == (None, "a LayerNorm (mean-centred, with bias)")
    # bf16: Llama rounds n to bf16 before the weight; OLMo 2 multiplies in fp32 and rounds once. Same
    # math in fp32 (the first convention that matches is taken), told apart by the 16-bit check.
    assert probe_norm(Olmo2RMSNorm(32))[0] == (0.0, False)
    assert probe_norm(LlamaRMSNorm(32).to(torch.bfloat16))[0] == (0.0, False)
    assert probe_norm(Olmo2RMSNorm(32).to(torch.bfloat16)) == ((0.0, True), "fp32 weight, variance_epsilon")
    assert probe_norm(_Bf16RMSNorm(32).float())[0] == (0.0, False)
    style, why = probe_norm(_Bf16RMSNorm(32).to(torch.bfloat16))
    assert style is None and "rounds like none" in why, why


def test_lora_probe_and_dora_fallback(tmp_path):
    fast, stock = _pair("cohere", tmp_path, use_dora=True)
    layer = fast.get_base_model().model.layers[0].self_attn.q_proj
    assert "not fusable" in probe_lora(layer)
    assert not is_patched(layer) and "0 layer(s) fused, 14 on the stock PEFT path" in report(fast)
    _assert_same_training(_train_pair(fast, stock, 2, [fixed_batch()]))


def test_unpatch_restores_stock(tmp_path):
    fast, stock = _pair("cohere", tmp_path)
    batch = fixed_batch()
    fused = fast(**batch).loss
    assert unpatch(fast) > 0 and generic_plan(fast) is None
    assert not any("forward" in m.__dict__ for m in fast.modules())
    assert "stock" in report(fast)
    out = fast(**batch)
    assert out.logits is not None and _rel(out.loss.double(), fused.double()) <= TOL


@pytest.mark.parametrize("kind", ["cohere", "mixtral"])
def test_generic_triton_kernels_match_stock(kind, tmp_path):
    """The Triton kernels themselves (interpreter): fused CE with the folded scale, RMSNorm."""
    from velotune.kernels import force_triton

    fast, stock = _pair(kind, tmp_path)
    batch = fixed_batch(batch=1, seq=8, pad_last=0)
    with force_triton():
        loss = fast(**batch).loss
        loss.backward()
    ref = stock(**batch).loss
    ref.backward()
    assert _rel(loss.detach().double(), ref.detach()) <= TOL
    grads = dict(_trainable(fast))
    for n, p in _trainable(stock):
        assert _rel(grads[n].grad.double(), p.grad) <= TOL, n


@pytest.mark.parametrize("kind", ["mixtral", "cohere"])
def test_generic_probes_on_a_bf16_model(kind):
    """In a bf16 model the probes still run in fp32 (copies), plus the 16-bit rounding check for norms and
    the patched-vs-stock loss on the probe tokens at the 16-bit bar."""
    from transformers import AutoModelForCausalLM

    from velotune.models import prepare_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(generic_config(kind), dtype=torch.bfloat16)
    assert prepare_model(model, max_seq_length=64)
    text = report(model)
    assert "lm_head    fast  fused linear cross-entropy" in text, text
    if kind == "mixtral":
        assert "norm       fast  MixtralRMSNorm (x5, offset 0" in text, text
    batch = fixed_batch()
    fused = model(**batch).loss
    unpatch(model)
    assert _rel(fused.double(), model(**batch).loss.double()) <= 1e-2


def test_generic_generation_equals_stock(tmp_path):
    """for_inference on the generic path: stock generate (no fast decode engine) over the fused norms
    and LoRA layers: greedy tokens equal stock transformers + PEFT."""
    fast, stock = _pair("mixtral", tmp_path)
    stock = copy.deepcopy(stock).float()
    FastLanguageModel.for_inference(fast)
    stock.eval()
    ids = fixed_batch(batch=1, seq=6, pad_last=0)["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(input_ids=ids, **kw), stock.generate(input_ids=ids, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt_neox", "cohere", "mixtral"])
def test_gpu_generic_path_bf16(kind):
    """On the GPU (Triton kernels, bf16 model): the probes pass where they do on CPU, and a LoRA step's
    loss and gradients are as close to an fp32 reference (stock transformers + PEFT, same weights) as
    stock's own bf16 step is: error at most 1.5x stock's."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = AutoModelForCausalLM.from_config(
            generic_config(kind, hidden_size=256, intermediate_size=512), dtype=torch.bfloat16
        )
    stock_base = copy.deepcopy(base)
    ref_base = copy.deepcopy(base).float()
    from velotune.models import prepare_model

    assert prepare_model(base, max_seq_length=128)
    fast = FastLanguageModel.get_peft_model(
        base, r=8, lora_alpha=16, target_modules=TARGETS[kind], use_gradient_checkpointing="unsloth"
    )
    text = report(fast)
    assert "lm_head    fast" in text and "0 on the stock PEFT path" in text, text
    if kind == "mixtral":
        assert "norm       fast  MixtralRMSNorm" in text, text
    stock = get_peft_model(stock_base, copy.deepcopy(fast.peft_config["default"]))
    stock.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = get_peft_model(ref_base, copy.deepcopy(fast.peft_config["default"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (n, p), (_, q), (_, r) in zip(fast.named_parameters(), stock.named_parameters(), ref.named_parameters()):
            if "lora_" in n:
                v = torch.randn(p.shape, generator=g) * 0.05
                p.copy_(v)
                q.copy_(v)
                r.copy_(v)
    batch = {k: v.cuda() for k, v in fixed_batch(batch=2, seq=64, pad_last=5).items()}
    fast.train(), stock.train(), ref.train()
    losses, grads = [], []
    for m in (fast, stock, ref):
        loss = m(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[2]) <= 1.5 * abs(losses[1] - losses[2]) + 1e-3 * abs(losses[2])
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and grads[0]
    for n in grads[2]:
        assert _rel(grads[0][n], grads[2][n]) <= 1.5 * _rel(grads[1][n], grads[2][n]), n
