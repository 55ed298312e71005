"""models/modes.py: a decoder layer's modes live on its patched modules, set for a block and restored."""

import pytest
import torch
from mini import fixed_batch, mini_model

from velotune.models import prepare_model, unpatch
from velotune.models.modes import OFF, LayerModes, layer_modes, modes_of


def test_set_restores_and_refuses_unknown_modes():
    modes = LayerModes()
    with modes.set(checkpointed_mlp=True, norm_outputs={}):
        assert modes.checkpointed_mlp and modes.norm_outputs == {}
        with modes.set(checkpointed_mlp=False):
            assert not modes.checkpointed_mlp
        assert modes.checkpointed_mlp
    assert modes == LayerModes()
    with pytest.raises(ValueError, match="unknown modes"):
        with modes.set(checkpointed=True):
            pass
    assert modes == LayerModes()


def test_a_layers_modes_reach_its_patched_modules_only():
    """The norm outputs a layer records while its modes say so: that layer's own norms, nothing from
    the other layers, and nothing once the block ends; patch and unpatch drop the handed-out modes."""
    model = mini_model("llama", num_hidden_layers=2)
    assert prepare_model(model, max_seq_length=64)
    first, second = model.model.layers
    modes = layer_modes(first)
    assert layer_modes(first) is modes and modes_of(first.mlp) is modes and modes_of(second.mlp) is OFF
    table: dict = {}
    with torch.no_grad(), modes.set(norm_outputs=table):
        model(**fixed_batch())
    assert {m for m, _, _ in table.values()} == {first.input_layernorm, first.post_attention_layernorm}
    n = len(table)
    with torch.no_grad():
        model(**fixed_batch())
    assert len(table) == n and OFF == LayerModes()
    unpatch(model)
    assert not any("_velotune_modes" in m.__dict__ for m in model.modules())
