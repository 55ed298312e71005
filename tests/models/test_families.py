"""The family registry: one FamilySpec per family, read by training, inference and GGUF export."""

import math

import pytest
from mini import FAMILIES, mini_config

from velotune.kernels.glu import ACTIVATIONS, canonical_activation
from velotune.models.families import BY_MODEL_TYPE, SPECS, names, spec_for
from velotune.models.spec import FamilySpec


def test_every_registered_family_has_a_mini_config_and_back():
    assert set(names()) == set(FAMILIES)
    for spec in SPECS:
        config = mini_config(spec.name)
        assert spec_for(config) is spec and config.model_type in spec.model_types
    assert len(BY_MODEL_TYPE) == sum(len(s.model_types) for s in SPECS)


def test_spec_fields_are_validated():
    with pytest.raises(ValueError, match="sliding_window"):
        FamilySpec(name="x", classes="X", sliding_window="alternate")
    with pytest.raises(ValueError, match="qk_norm"):
        FamilySpec(name="x", classes="X", qk_norm="yes")


def test_class_names_derive_from_the_prefix_unless_given():
    spec = FamilySpec(name="x", classes="X", body="XTextModel")
    assert (spec.model_types, spec.causal_lm, spec.body, spec.attention, spec.mlp, spec.norm) == (
        ("x",),
        "XForCausalLM",
        "XTextModel",
        "XAttention",
        "XMLP",
        "XRMSNorm",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_window_of_matches_what_transformers_masks(family):
    """The decode path's per-layer window equals the one each stock attention layer is built with."""
    from transformers import AutoModelForCausalLM

    config = mini_config(family)
    model = AutoModelForCausalLM.from_config(config)
    spec = spec_for(config)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        # modules that carry their window say so; the others mask every layer by config.sliding_window
        want = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        assert spec.window_of(config, i) == want, (family, i)
    assert any(spec.window_of(config, i) for i in range(config.num_hidden_layers)) == (
        family in ("mistral", "gemma2", "qwen3", "gemma3_text", "ministral", "ministral3", "olmo3")
    )  # the minis whose windows are exercised


def test_one_activation_table():
    assert {canonical_activation(n) for n in ACTIVATIONS} == {"silu", "gelu", "gelu_tanh"}
    assert canonical_activation("relu") is None and canonical_activation(None) is None
    assert canonical_activation("gelu_pytorch_tanh") == "gelu_tanh" and canonical_activation("swish") == "silu"


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "ministral", "ministral3", "olmo3"])
def test_new_families_on_the_gpu_match_stock(family, tmp_path):
    """The real Triton kernels on a CUDA device, float32 (TF32 off): loss and every LoRA gradient against
    float64 stock transformers + PEFT on the same weights, within 1e-5 or within 1.5x of stock's own
    float32 error where that is larger (as tests/models/test_parity.py); then bf16 trains 3 steps."""
    import copy

    import torch
    from mini import fixed_batch, save_mini_model
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from velotune import FastLanguageModel

    torch.backends.cuda.matmul.allow_tf32 = False
    path = save_mini_model(family, tmp_path)
    fast, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, max_seq_length=128, device_map="cuda")
    fast = FastLanguageModel.get_peft_model(fast, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    stock = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda(),
        copy.deepcopy(fast.peft_config["default"]),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    fast.load_state_dict(stock.state_dict(), strict=False)
    stock32, stock64 = copy.deepcopy(stock), stock.double()
    batch = {k: v.cuda() for k, v in fixed_batch().items()}
    losses, grads = {}, {}
    for name, model in (("fast", fast), ("stock32", stock32), ("stock64", stock64)):
        loss = model(**batch).loss
        loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert _rel(losses["fast"], losses["stock64"]) <= max(1e-5, 1.5 * _rel(losses["stock32"], losses["stock64"]))
    for n, ref in grads["stock64"].items():
        own = _rel(grads["stock32"][n], ref)
        assert _rel(grads["fast"][n], ref) <= max(1e-5, 1.5 * own), n

    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16, max_seq_length=128, device_map="cuda")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing="unsloth")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    seen = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen.append(loss.item())
    assert all(math.isfinite(x) for x in seen) and seen[-1] < seen[0]


def test_ministral3_query_temperature_is_stocks_and_live_in_the_mini():
    """models/spec.query_temperature is transformers' own multiplier bit for bit, and the mini config
    (period 4, beta 0.5) changes the logits from position 4 on (and not before): the parity, padding-free,
    decode and GGUF tests of ministral3 fail where the temperature is missing or wrong."""
    import torch
    from mini import mini_model

    from velotune.models.spec import query_temperature

    stock = pytest.importorskip("transformers.models.ministral3.modeling_ministral3")
    pos = torch.tensor([[0, 1, 3, 4, 7, 8, 100, 16383, 16384, 40000]])
    for beta, period in ((0.1, 16384), (0.5, 4)):
        assert torch.equal(
            query_temperature(pos, beta, period), stock.get_llama_4_attn_scale(pos, beta, period)[:, 0, :, 0]
        )
    assert torch.equal(query_temperature(pos[:, :3], 0.1, 4), torch.ones(1, 3))

    ids = torch.randint(7, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    hot = mini_model("ministral3")
    cold = mini_model("ministral3")
    cold.config.rope_parameters["llama_4_scaling_beta"] = 0.0
    with torch.no_grad():
        a, b = hot(input_ids=ids).logits, cold(input_ids=ids).logits
    assert torch.equal(a[:, :4], b[:, :4])
    assert ((a[:, 4:] - b[:, 4:]).norm() / a[:, 4:].norm()).item() > 1e-3  # 100x the parity tests' bar
    assert spec_for(hot.config).temperature_of(hot.config) == (0.5, 4)
