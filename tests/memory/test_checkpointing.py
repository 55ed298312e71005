"""`enable_checkpointing(model, True)`: transformers' non-reentrant checkpointing, switched on through
its current API (the deprecated `gradient_checkpointing_enable` would warn on every get_peft_model)."""

from __future__ import annotations

import warnings

import torch

from mini import fixed_batch, mini_model
from velotune.memory import enable_checkpointing


def test_plain_checkpointing_without_deprecation_warnings():
    model = mini_model("llama").train()
    batch = fixed_batch()
    expected = model(**batch).loss
    expected.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        enable_checkpointing(model, True)
        assert model.is_activation_checkpointing and model.config.use_cache is False
    loss = model(**batch).loss
    loss.backward()
    assert torch.equal(loss, expected)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=0, msg=n)
