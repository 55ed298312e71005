"""SFT, DPO, ORPO and continued pretraining each train a few steps on the shipped toy data and lower
their loss; the run leaves a PEFT adapter, a loss-curve PNG and a summary JSON."""

from __future__ import annotations

import json

import pytest
import torch

from velotune.train.runner import run_training

from train_setup import make_config, toy_slice


def decreasing(losses):
    return len(losses) >= 3 and losses[-1] < losses[0] - 1e-3


def test_sft_lowers_loss_and_saves_a_stock_peft_adapter(mini_llama, tmp_path):
    import importlib.util

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tensorboard = importlib.util.find_spec("tensorboard") is not None  # the [tensorboard] extra
    cfg = make_config(
        mini_llama,
        toy_slice("sft.jsonl", 4, tmp_path),
        tmp_path / "out",
        eval_path=str(toy_slice("sft.jsonl", 2, tmp_path)),
        training={"eval_steps": 4, "report_to": "tensorboard" if tensorboard else "none"},
    )
    result = run_training(cfg, progress=False)
    assert decreasing(result.losses), result.losses
    assert result.steps == [1, 2, 3, 4]
    assert result.summary["last_eval_loss"] is not None
    if tensorboard:
        assert list((result.output_dir / "runs").rglob("events.out.tfevents.*"))

    # The artefacts: PNG, summary, adapter + tokenizer.
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(result.summary_path.read_text())
    assert summary["steps"] == 4 and summary["first_loss"] == result.losses[0]
    assert summary["last_loss"] == result.losses[-1] and summary["tokens_per_second"] > 0
    assert summary["data_report"]["total"] == 4 and summary["data_report"]["kept"] == 4
    assert summary["method"] == "sft" and summary["data_format"] == "messages"
    out = result.adapter_path
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(out.glob(".save-*"))  # the temp folder of the atomic save is gone

    # Stock PEFT reloads the adapter and gives the trained model's logits.
    ids = torch.tensor([[5, 9, 40, 77, 12, 3]])
    trained = result.model.eval()
    base = AutoModelForCausalLM.from_pretrained(mini_llama, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_methods_lower_loss(mini_llama, tmp_path, method):
    cfg = make_config(
        mini_llama,
        toy_slice("preferences.jsonl", 4, tmp_path),
        tmp_path / "out",
        method,
        training={"beta": 0.5, "learning_rate": 2e-2 if method == "dpo" else 5e-3},
    )
    result = run_training(cfg, progress=False)
    assert decreasing(result.losses), result.losses
    if method == "dpo":  # the policy starts equal to the reference (adapter off): loss = log 2
        assert result.losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert not (result.output_dir / "ref").exists()  # only the trained adapter is saved
    assert json.loads(result.summary_path.read_text())["method"] == method


def test_continued_pretraining_trains_embeddings_with_their_own_lr(mini_llama, tmp_path):
    cfg = make_config(
        mini_llama,
        toy_slice("corpus.jsonl", 6, tmp_path),
        tmp_path / "out",
        lora={"modules_to_save": ["embed_tokens", "lm_head"]},
        training={"embedding_learning_rate": 1e-3},
        format="text",
        train_on="all",
    )
    result = run_training(cfg, progress=False)
    assert decreasing(result.losses), result.losses

    groups = result.trainer.optimizer.param_groups
    embed = [g for g in groups if g.get("velotune_group") == "embeddings"]
    other = [g for g in groups if g.get("velotune_group") != "embeddings"]
    assert embed and other
    assert {g["initial_lr"] for g in embed} == {1e-3} and {g["initial_lr"] for g in other} == {1e-2}
    embed_params = {id(p) for g in embed for p in g["params"]}
    named = dict(result.model.named_parameters())
    save_names = [n for n in named if "modules_to_save" in n]
    assert len(save_names) == 2 and {id(named[n]) for n in save_names} == embed_params
    lora_ids = {id(p) for n, p in named.items() if "lora_" in n}
    assert lora_ids and lora_ids.isdisjoint(embed_params)
    # The trained copies moved away from the frozen originals.
    emb = result.model.base_model.model.model.embed_tokens
    assert not torch.equal(emb.modules_to_save["default"].weight, emb.original_module.weight)


def test_cli_trains_with_overrides_and_reports_missing_checkpoints(mini_llama, tmp_path, capsys):
    import yaml

    from velotune import PatchDPOTrainer
    from velotune.cli import main

    assert PatchDPOTrainer() is None and PatchDPOTrainer() is None  # a harmless, repeatable no-op

    data = toy_slice("sft.jsonl", 2, tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(mini_llama), "dtype": "float32", "max_seq_length": 64},
                "data": {"path": data.name, "packing": True},
                "lora": {"r": 4, "gradient_checkpointing": False},
                "training": {"max_steps": 50, "batch_size": 2, "gradient_accumulation_steps": 1, "use_cpu": True},
                "output_dir": "from-yaml",
            }
        )
    )
    out = tmp_path / "from-cli"
    assert main(["train", str(path), "--max-steps", "2", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"summary:               {out / 'summary.json'}" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert not (tmp_path / "from-yaml").exists()

    assert main(["train", str(path), "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "training.resume_from_checkpoint: no complete checkpoint-N folder in" in capsys.readouterr().err


def test_lora_settings_the_model_cannot_take_are_a_config_error(mini_llama, tmp_path):
    """A refusal from get_peft_model (here: offload_embedding on a trainable table) reaches the CLI as a
    one-line ConfigError naming the section, not a traceback."""
    from velotune.errors import ConfigError
    from velotune.train.runner import add_adapters, load_model

    cfg = make_config(
        mini_llama,
        toy_slice("sft.jsonl", 4, tmp_path),
        tmp_path / "out",
        lora={"offload_embedding": True, "modules_to_save": ["embed_tokens"]},
    )
    model, _ = load_model(cfg)
    with pytest.raises(ConfigError, match="^lora: offload_embedding: the input embeddings are trainable"):
        add_adapters(model, cfg)


def test_yaml_lora_settings_reach_the_model(mini_llama, tmp_path):
    """lora.gradient_checkpointing / lora.recompute / lora.cuda_graphs / lora.mlp_row_blocks from a
    config end up on the model add_adapters builds."""
    from velotune.memory.layer_graphs import LayerGraphs
    from velotune.train.runner import add_adapters, load_model
    from velotune.memory.saved_offload import SavedOffloader

    for graphs in (False, True):
        cfg = make_config(
            mini_llama,
            toy_slice("sft.jsonl", 4, tmp_path),
            tmp_path / "out",
            lora={
                "gradient_checkpointing": "unsloth",
                "recompute": "mlp",
                "cuda_graphs": graphs,
                "mlp_row_blocks": 1 + 3 * graphs,
            },
        )
        model, _ = load_model(cfg)
        model = add_adapters(model, cfg)
        layer = model.base_model.model.model.layers[0]
        assert layer.mlp._velotune_row_blocks == 1 + 3 * graphs
        keywords = layer._gradient_checkpointing_func.keywords
        assert isinstance(keywords["saved"], SavedOffloader)
        assert isinstance(keywords["graphs"], LayerGraphs) if graphs else keywords["graphs"] is None


def test_offloaded_optimizer_trains_the_same_bits(mini_llama, tmp_path):
    """training.optimizer: adamw_offload (memory/offload_adamw.py, the moments in host memory) gives
    the losses of adamw_torch, step for step, with weight decay and a schedule."""
    from velotune.memory.offload_adamw import OffloadedAdamW

    runs = {}
    for name in ("adamw_torch", "adamw_offload"):
        cfg = make_config(
            mini_llama,
            toy_slice("sft.jsonl", 4, tmp_path),
            tmp_path / name,
            training={"optimizer": name, "weight_decay": 0.1, "lr_scheduler": "cosine"},
        )
        runs[name] = run_training(cfg, progress=False)
    opt = runs["adamw_offload"].trainer.optimizer
    assert isinstance(getattr(opt, "optimizer", opt), OffloadedAdamW)  # under accelerate's wrapper
    assert runs["adamw_offload"].losses == runs["adamw_torch"].losses and len(runs["adamw_torch"].losses) == 4
    a = dict(runs["adamw_torch"].model.named_parameters())
    b = dict(runs["adamw_offload"].model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a if "lora_" in n)
