"""Each torch reference equals the transformers implementation it stands for (so "exact" = "stock"),
and the public functions on CPU (reference dispatch) give the same values and gradients."""

import pytest
import torch
import transformers as tf
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from velotune.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from velotune.kernels.fused_linear_ce import fused_linear_cross_entropy
from velotune.kernels.glu import geglu, glu_backward, glu_forward, swiglu
from velotune.kernels.rmsnorm import rms_norm, rms_norm_reference
from velotune.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_reference_is_llama_and_gemma2(dtype):
    x = torch.randn(2, 5, 33).to(dtype)
    llama = LlamaRMSNorm(33, eps=1e-6)
    gemma = Gemma2RMSNorm(33, eps=1e-6)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    torch.testing.assert_close(rms_norm_reference(x, llama.weight, 1e-6), llama(x), rtol=0, atol=0)
    torch.testing.assert_close(rms_norm_reference(x, gemma.weight, 1e-6, offset=1.0), gemma(x), rtol=0, atol=0)
    torch.testing.assert_close(rms_norm(x, llama.weight, 1e-6), llama(x), rtol=0, atol=0)


def _rope_config(kind):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "default":
        return tf.LlamaConfig(**base)
    if kind == "linear":
        return tf.LlamaConfig(**base, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    if kind == "dynamic":
        return tf.LlamaConfig(**base, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    if kind == "llama3":
        return tf.LlamaConfig(
            **base,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            },
        )
    if kind == "longrope":
        half = 8  # head_dim 16 * partial 1.0 / 2
        return tf.Phi3Config(
            **{**base, "max_position_embeddings": 128},
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(half)],
                "long_factor": [1.5 + 0.2 * i for i in range(half)],
                "original_max_position_embeddings": 32,
            },
        )
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["default", "linear", "dynamic", "llama3", "longrope"])
@pytest.mark.parametrize("length", [8, 100])
def test_rope_cos_sin_is_transformers(kind, length):
    cfg = _rope_config(kind)
    cls = Phi3RotaryEmbedding if kind == "longrope" else LlamaRotaryEmbedding
    emb = cls(cfg)  # fresh module per call: see rope_inv_freq's note on its length cache
    pos = torch.stack([torch.arange(length), torch.arange(length).flip(0)])
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = emb(x, pos)
    cos, sin = rope_cos_sin(cfg, pos, "cpu")
    torch.testing.assert_close(cos, cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_ref, rtol=0, atol=0)


def test_rope_reference_is_apply_rotary_pos_emb():
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 2, 7, 16)
    cos, sin = rope_cos_sin(_rope_config("llama3"), torch.arange(7)[None].expand(2, 7), "cpu")
    ref = apply_rotary_pos_emb(q, k, cos, sin)
    for a, b in zip(apply_rope_reference(q, k, cos, sin), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(apply_rope(q, k, cos, sin), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_glu_reference_is_act2fn(act):
    gate, up = torch.randn(3, 17), torch.randn(3, 17)
    ref = ACT2FN[act](gate) * up
    torch.testing.assert_close(glu_forward(gate, up, act), ref, rtol=0, atol=0)
    fn = {"silu": swiglu, "gelu": geglu, "gelu_pytorch_tanh": lambda g, u: geglu(g, u, "tanh")}[act]
    torch.testing.assert_close(fn(gate, up), ref, rtol=0, atol=0)
    # the hand-derived CPU backward vs autograd through ACT2FN
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    dh = torch.randn(3, 17)
    (ACT2FN[act](g) * u).backward(dh)
    dg, du = glu_backward(dh, gate.clone(), up.clone(), act)
    torch.testing.assert_close(dg, g.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, u.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_items", [None, 7])
def test_cross_entropy_reference_is_for_causal_lm_loss(num_items):
    logits, labels = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    labels[0, :2] = -100
    ref = ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=num_items)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    ours = cross_entropy(logits.reshape(-1, 11), shifted, num_items_in_batch=num_items)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_cross_entropy_softcap_is_gemma2():
    cfg = tf.Gemma2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=3.0,
    )
    model = tf.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 9))
    out = model(ids, labels=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # already final-normed
    labels = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:].reshape(-1)
    ours = cross_entropy_reference(model.lm_head(hidden).reshape(-1, 50), labels, softcap=3.0)
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=0)
    fused = fused_linear_cross_entropy(
        hidden.reshape(-1, 16), model.lm_head.weight, labels, softcap=3.0, memory_budget_bytes=5 * 50 * 4
    )
    torch.testing.assert_close(fused, out.loss, rtol=1e-5, atol=0)
