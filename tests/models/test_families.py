"""The family registry: one FamilySpec per family, read by training, inference and GGUF export."""
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
        FamilySpec(name="x", model_types=("x",), causal_lm="A", attention="B", mlp="C", norm="D",
                   sliding_window="alternate")
    with pytest.raises(ValueError, match="qk_norm"):
        FamilySpec(name="x", model_types=("x",), causal_lm="A", attention="B", mlp="C", norm="D", qk_norm="yes")


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
        family in ("mistral", "gemma2", "qwen3", "gemma3_text", "ministral"))  # the minis whose windows are exercised


def test_one_activation_table():
    assert {canonical_activation(n) for n in ACTIVATIONS} == {"silu", "gelu", "gelu_tanh"}
    assert canonical_activation("relu") is None and canonical_activation(None) is None
    assert canonical_activation("gelu_pytorch_tanh") == "gelu_tanh" and canonical_activation("swish") == "silu"
