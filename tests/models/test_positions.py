"""models/positions.py: a training forward without position_ids or padding mask hands transformers'
packed-sequence check host ids (no read-back from the GPU), the rotary module their device copy, and
trains exactly as with the ids transformers makes itself."""

from __future__ import annotations

import pytest
import torch
from mini import fixed_batch, mini_model
from transformers import masking_utils

from velotune.models import prepare_model, unpatch


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: full and sliding-window masks
def test_default_positions_go_to_the_mask_check_in_host_memory(family, monkeypatch):
    batch = fixed_batch(pad_last=0)
    del batch["attention_mask"]
    explicit = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).unsqueeze(0))
    ref = mini_model(family)
    prepare_model(ref, max_seq_length=64)
    want = ref(**explicit).loss  # the ids given: transformers' own path
    want.backward()

    model = mini_model(family)
    prepare_model(model, max_seq_length=64)
    checked, rotated = [], []
    real = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda p: checked.append(p) or real(p))
    rotary = model.model.rotary_emb
    rotary.register_forward_hook(
        lambda m, a, k, out: rotated.append(a[1] if len(a) > 1 else k["position_ids"]), with_kwargs=True
    )  # sees the inputs after the pre-hooks
    loss = model(**batch).loss
    loss.backward()
    host, copies = rotary._velotune_positions[batch["input_ids"].shape[1]]
    assert checked and all(p.device.type == "cpu" and p.data_ptr() == host.data_ptr() for p in checked)
    assert len(rotated) == 1 and rotated[0] is copies[torch.device("cpu")] and rotated[0] is not host  # its copy
    assert torch.equal(loss, want)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name

    unpatch(model)
    assert "_velotune_positions" not in rotary.__dict__ and not rotary._forward_pre_hooks


def test_given_positions_or_a_padding_mask_are_left_alone():
    model = mini_model("llama")
    prepare_model(model, max_seq_length=64)
    model(**fixed_batch()).loss.backward()  # a padding mask: transformers' path
    batch = fixed_batch(pad_last=0)
    del batch["attention_mask"]
    model(**dict(batch, position_ids=torch.arange(12).expand(2, 12))).loss.backward()  # packed-style ids
    assert "_velotune_positions" not in model.model.rotary_emb.__dict__
