"""push_to_hub_merged / push_to_hub_gguf: Unsloth's names and keywords, everything up to the network.

The hub is a local stand-in (helpers.RecordingHfApi, a subclass of huggingface_hub's HfApi whose two
network calls record their arguments, bound to the real signatures, and keep a copy of the upload).
"""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingHfApi, logits, lora_model, rel_err
from mini import VOCAB

from velotune.errors import ConfigError

IDS = torch.randint(7, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model_tok():
    return lora_model("llama")


def test_push_to_hub_merged_sends_the_saved_folder(model_tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = model_tok
    api = RecordingHfApi(tmp_path / "hub")
    plan = model.push_to_hub_merged(
        "me/merged",
        tok,
        "merged_16bit",
        token="hf_t0k",
        private=True,
        commit_message="first",
        commit_description="LoRA merged",
        api=api,
    )
    (create, created), (upload, uploaded) = api.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert created == dict(repo_id="me/merged", token="hf_t0k", private=True, repo_type="model", exist_ok=True)
    assert uploaded["repo_id"] == "me/merged" and uploaded["token"] == "hf_t0k" and uploaded["repo_type"] == "model"
    assert uploaded["commit_message"] == "first" and uploaded["commit_description"] == "LoRA merged"
    assert uploaded["path_in_repo"] is None and uploaded["create_pr"] is False
    assert plan["url"] == "https://huggingface.co/me/merged/commit/" + "0" * 40
    sent = api.uploads[0]
    assert sorted(p.name for p in sent.iterdir()) == plan["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(plan["files"])
    merged = AutoModelForCausalLM.from_pretrained(sent, dtype=torch.float32)
    assert rel_err(logits(merged, IDS), logits(model, IDS)) <= 1e-5


def test_push_to_hub_merged_lora_defaults_and_pr(model_tok, tmp_path):
    model, tok = model_tok
    api = RecordingHfApi(tmp_path / "hub")
    plan = model.push_to_hub_merged(
        "me/adapter", tok, save_method="lora", token="", create_pr=True, revision="main", api=api
    )
    created, uploaded = api.calls[0][1], api.calls[1][1]
    assert created["token"] is None and created["private"] is None  # "" (Unsloth's notebooks): the saved login
    assert uploaded["token"] is None and uploaded["create_pr"] is True and uploaded["revision"] == "main"
    assert uploaded["commit_message"] == f"velotune export ({len(plan['files'])} files)"
    assert plan["url"] == "https://huggingface.co/me/adapter/discussions/1"
    assert "adapter_model.safetensors" in plan["files"] and "model.safetensors" not in plan["files"]


def test_push_to_hub_gguf_methods_and_aliases(model_tok, tmp_path):
    model, tok = model_tok
    api = RecordingHfApi(tmp_path / "hub")
    plan = model.push_to_hub_gguf("me/gguf", tok, quantization_method=["fast_quantized", "f16"], api=api)
    assert plan["files"] == ["Modelfile", "model.F16.gguf", "model.Q8_0.gguf"]
    assert sorted(p.name for p in api.uploads[0].iterdir()) == plan["files"]
    assert "FROM ./model.Q8_0.gguf" in (api.uploads[0] / "Modelfile").read_text()
    plan = model.push_to_hub_gguf("me/gguf", tok, "q8_0", token="t", commit_message="gguf", api=api)
    assert plan["files"] == ["Modelfile", "model.Q8_0.gguf"] and api.calls[-1][1]["commit_message"] == "gguf"
    assert api.calls[-1][1]["token"] == "t" and len(api.calls) == 4


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, t, api: m.push_to_hub_gguf("no-owner", t, api=api), "owner"),
        (lambda m, t, api: m.push_to_hub_merged("bad id!", t, api=api), "bad hub repo id"),
        (lambda m, t, api: m.push_to_hub_merged("me/x", t, save_method="merged_8bit", api=api), "save_method"),
        (lambda m, t, api: m.push_to_hub_gguf("me/x", t, quantization_method="q9", api=api), "quantization_method"),
        (lambda m, t, api: m.push_to_hub_gguf("me/x", None, api=api), "tokenizer"),
    ],
)
def test_bad_arguments_are_refused_before_any_upload(model_tok, tmp_path, call, message):
    model, tok = model_tok
    api = RecordingHfApi(tmp_path / "hub")
    with pytest.raises(ConfigError, match=message):
        call(model, tok, api)
    assert api.calls == []
