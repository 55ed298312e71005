"""Config errors are one readable line naming the bad key; the CLI prints them and exits with 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from velotune.errors import ConfigError
from velotune.train.config import TrainConfig, load_config

from train_setup import EXAMPLES, TOY


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def good(tmp_path) -> dict:
    return {
        "model": {"name": "some-org/some-model"},
        "data": {"path": str(TOY / "sft.jsonl")},
        "output_dir": str(tmp_path / "out"),
    }


def error_of(tmp_path, cfg) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    return str(e.value)


def test_examples_validate():
    for name in ("sft", "dpo", "orpo", "cpt", "qlora"):
        cfg = load_config(EXAMPLES / f"{name}.yaml")
        assert Path(cfg.data.path).is_file()  # relative paths resolved from the YAML's folder
    assert load_config(EXAMPLES / "cpt.yaml").training.embedding_learning_rate == 1e-4


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    cfg = good(tmp_path)
    cfg["training"] = {"learnig_rate": 1e-4}
    msg = error_of(tmp_path, cfg)
    assert msg == "run.yaml: training.learnig_rate: unknown key in training; did you mean 'learning_rate'?"
    cfg = good(tmp_path)
    cfg["lora_config"] = {}
    assert "run.yaml: lora_config: unknown key in the top level" in error_of(tmp_path, cfg)


def test_bad_type_and_bad_choice(tmp_path):
    cfg = good(tmp_path)
    cfg["training"] = {"batch_size": "many"}
    msg = error_of(tmp_path, cfg)
    assert msg.startswith("run.yaml: training.batch_size: should be a valid integer") and "'many'" in msg
    cfg = good(tmp_path)
    cfg["method"] = "ppo"
    assert error_of(tmp_path, cfg) == "run.yaml: method: should be 'sft', 'dpo' or 'orpo' (got 'ppo')"
    cfg = good(tmp_path)
    cfg["lora"] = {"r": -4}
    assert error_of(tmp_path, cfg) == "run.yaml: lora.r: should be greater than 0 (got -4)"


def test_missing_keys_and_inconsistent_settings(tmp_path):
    cfg = good(tmp_path)
    del cfg["data"]
    assert error_of(tmp_path, cfg) == "run.yaml: data: missing required key"
    cfg = good(tmp_path)
    cfg["method"] = "dpo"
    cfg["data"]["format"] = "alpaca"
    assert "run.yaml: data.format: method dpo needs preference data" in error_of(tmp_path, cfg)
    cfg = good(tmp_path)
    lora = load_config(write(tmp_path, cfg)).lora  # the defaults are the library's
    assert (lora.gradient_checkpointing, lora.recompute, lora.offload_embedding) == ("unsloth", None, "auto")
    assert load_config(write(tmp_path, cfg)).model.padding_free is True
    cfg["lora"] = {"recompute": "mlp", "gradient_checkpointing": True}
    assert error_of(tmp_path, cfg) == (
        "run.yaml: lora.recompute: 'mlp' needs lora.gradient_checkpointing: unsloth (or offload), not True"
    )
    cfg["lora"]["gradient_checkpointing"] = "unsloth"
    assert load_config(write(tmp_path, cfg)).lora.recompute == "mlp"
    cfg["lora"]["recompute"] = "attention"
    assert error_of(tmp_path, cfg).startswith("run.yaml: lora.recompute: should be 'layer' or 'mlp'")
    cfg = good(tmp_path)
    cfg["lora"] = {"cuda_graphs": True, "gradient_checkpointing": True}
    assert error_of(tmp_path, cfg) == (
        "run.yaml: lora.cuda_graphs: true needs lora.gradient_checkpointing: unsloth (or offload), not True"
    )
    cfg["lora"].update(gradient_checkpointing="unsloth", recompute="mlp")
    assert load_config(write(tmp_path, cfg)).lora.cuda_graphs is True
    cfg = good(tmp_path)
    cfg["lora"] = {"mlp_row_blocks": 4, "recompute": "layer"}
    assert error_of(tmp_path, cfg) == "run.yaml: lora.mlp_row_blocks: 4 needs lora.recompute: mlp, not 'layer'"
    cfg["lora"] = {"mlp_row_blocks": 0, "recompute": "mlp", "gradient_checkpointing": "unsloth"}
    assert error_of(tmp_path, cfg).startswith("run.yaml: lora.mlp_row_blocks: ")
    cfg["lora"]["mlp_row_blocks"] = 4
    assert load_config(write(tmp_path, cfg)).lora.mlp_row_blocks == 4
    cfg = good(tmp_path)
    cfg["training"] = {"embedding_learning_rate": 1e-5}
    assert error_of(tmp_path, cfg).startswith("run.yaml: training.embedding_learning_rate: set lora.modules_to_save")


def test_missing_files(tmp_path):
    cfg = good(tmp_path)
    cfg["data"]["path"] = "nowhere/train.jsonl"  # relative to the YAML's folder
    assert error_of(tmp_path, cfg) == (
        f"run.yaml: data.path: data file {tmp_path / 'nowhere/train.jsonl'} does not exist"
    )
    cfg = good(tmp_path)
    cfg["model"]["name"] = "./no-model-here"
    assert error_of(tmp_path, cfg) == f"run.yaml: model.name: model folder {tmp_path / 'no-model-here'} does not exist"
    with pytest.raises(ConfigError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line 2"):
        load_config(tmp_path / "broken.yaml")


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from velotune.cli import main

    cfg = good(tmp_path)
    cfg["training"] = {"learning_rate": "fast"}
    assert main(["train", str(write(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("velotune train: error: run.yaml: training.learning_rate: should be a valid number")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    cfg = good(tmp_path)
    cfg["data"]["path"] = str(tmp_path / "gone.jsonl")
    assert main(["train", str(write(tmp_path, cfg))]) == 2
    assert f"data.path: data file {tmp_path / 'gone.jsonl'} does not exist" in capsys.readouterr().err
    assert main(["train", str(write(tmp_path, good(tmp_path))), "--max-steps", "0"]) == 2
    assert "--max-steps: must be a positive number" in capsys.readouterr().err


def test_python_construction_has_defaults():
    cfg = TrainConfig(model={"name": "m"}, data={"path": "d.jsonl"})
    assert cfg.method == "sft" and cfg.lora.r == 16 and cfg.training.gradient_accumulation_steps == 4
    with pytest.raises(ValueError):
        TrainConfig(model={"name": "m"}, data={"path": "d.jsonl"}, extra=1)


def test_data_format_detection_and_mismatch():
    from velotune.errors import DataError
    from velotune.train.datasets import check_format, detect_format

    assert detect_format(["messages"]) == "messages" and detect_format(["prompt", "completion"]) == "messages"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt", "chosen", "rejected"]) == "preference" and detect_format(["text"]) == "text"
    with pytest.raises(DataError, match="cannot tell the data format from the columns"):
        detect_format(["question", "answer"])
    with pytest.raises(DataError, match="data.format is 'alpaca' but d.jsonl has columns \\['messages'\\]"):
        check_format("alpaca", ["messages"], "d.jsonl")
    check_format("sharegpt", ["conversations"], "d.jsonl")
