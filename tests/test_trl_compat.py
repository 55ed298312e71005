"""velotune.trl_compat: older TRL / transformers argument names run on TRL 1.x's real trainers, train exactly as
today's names do, leave code that uses today's names untouched, and come off again with uninstall()."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from velotune import trl_compat
from velotune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Question: what is two plus two? Answer: four.",
    "velotune fine-tunes language models fast and exactly.",
]
PREFS = [
    {
        "prompt": [{"role": "user", "content": "What is two plus two?"}],
        "chosen": [{"role": "assistant", "content": "four"}],
        "rejected": [{"role": "assistant", "content": "five"}],
    },
    {
        "prompt": [{"role": "user", "content": "Hello world!"}],
        "chosen": [{"role": "assistant", "content": "How are you today?"}],
        "rejected": [{"role": "assistant", "content": "The lazy dog."}],
    },
]


@pytest.fixture(autouse=True)
def _fresh_layer():
    """Every test starts and ends without the layer (a model load may have installed it)."""
    trl_compat.uninstall()
    yield
    trl_compat.uninstall()


@pytest.fixture(scope="module")
def mini_path(tmp_path_factory):
    from mini import save_mini_model

    return save_mini_model("llama", tmp_path_factory.mktemp("models"))


def lora_model(path):
    """A velotune mini Llama with LoRA (same weights every call) and its tokenizer."""
    from velotune import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=128, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False, random_state=0)
    with torch.no_grad():  # non-zero B: every LoRA factor trains from the first step
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(i))
    return model, tok


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_install_is_explicit_idempotent_and_revertible(caplog):
    import transformers
    import trl

    originals = {
        c: vars(c).get("__init__")
        for c in (trl.SFTTrainer, trl.SFTConfig, trl.DPOConfig, transformers.TrainingArguments)
    }
    with pytest.raises(ImportError):
        from trl import ORPOConfig  # noqa: F401  (TRL 1.x: only in trl.experimental.orpo)
    with pytest.raises(TypeError, match="warmup_ratio"):
        trl.DPOConfig(output_dir="o", warmup_ratio=0.1, **CPU)

    with caplog.at_level(logging.INFO, logger="velotune"):
        assert trl_compat.install() is True
        assert trl_compat.install() is False  # a second call changes nothing and says nothing
    lines = [r for r in caplog.records if r.name == "velotune" and "TRL compatibility on" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    from trl import ORPOConfig, ORPOTrainer

    assert (ORPOConfig, ORPOTrainer) == trl_compat.orpo_classes()
    assert all(vars(c).get("__init__") is not f for c, f in originals.items())

    assert trl_compat.uninstall() is True and trl_compat.uninstall() is False
    assert all(vars(c).get("__init__") is f for c, f in originals.items())  # the very same functions again
    assert "ORPOConfig" not in vars(trl) and "ORPOTrainer" not in vars(trl)
    with pytest.raises(ImportError):
        from trl import ORPOTrainer  # noqa: F401,F811


def test_older_config_names_map_onto_todays():
    import transformers
    from trl import DPOConfig, SFTConfig

    trl_compat.install()
    for ratio, total in ((0.1, 100), (0.25, 10), (0.3, 7), (0.0, 5)):
        args = DPOConfig(output_dir="o", warmup_ratio=ratio, **CPU)
        assert args.get_warmup_steps(total) == math.ceil(total * ratio)  # transformers 4's rule for warmup_ratio
    whole = DPOConfig(output_dir="o", warmup_ratio=1.0, **CPU)
    assert [whole.get_warmup_steps(n) for n in (1, 3, 10, 1000, 123457)] == [1, 3, 10, 1000, 123457]
    assert DPOConfig(output_dir="o", warmup_ratio=0.5, warmup_steps=5, **CPU).warmup_steps == 5  # steps win, as before

    args = transformers.TrainingArguments(
        output_dir="o",
        evaluation_strategy="steps",
        eval_steps=3,
        no_cuda=True,
        per_gpu_train_batch_size=3,
        group_by_length=True,
        overwrite_output_dir=True,
        save_safetensors=True,
        report_to="none",
    )
    assert args.eval_strategy == "steps" and args.use_cpu and args.per_device_train_batch_size == 3
    assert args.train_sampling_strategy == "group_by_length"
    assert SFTConfig(output_dir="o", max_seq_length=77, **CPU).max_length == 77

    with pytest.raises(ConfigError, match=r"warmup_ratio must be a number in \[0, 1\]"):
        DPOConfig(output_dir="o", warmup_ratio=1.5, **CPU)
    with pytest.raises(ConfigError, match="max_seq_length=77 and max_length=5 both given"):
        SFTConfig(output_dir="o", max_seq_length=77, max_length=5, **CPU)
    with pytest.raises(ConfigError, match="always saves safetensors"):
        transformers.TrainingArguments(output_dir="o", save_safetensors=False)
    with pytest.raises(TypeError, match="no_such_argument"):  # names the layer does not know stay errors
        SFTConfig(output_dir="o", no_such_argument=1, **CPU)


def test_code_with_todays_names_is_untouched(mini_path, tmp_path):
    from trl import SFTConfig, SFTTrainer

    kwargs = dict(output_dir=str(tmp_path), max_length=64, dataset_text_field="text", max_steps=1, **CPU)
    before = SFTConfig(**kwargs).to_dict()
    trl_compat.install()
    args = SFTConfig(**kwargs)
    assert args.to_dict() == before
    model, tok = lora_model(mini_path)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}), processing_class=tok)
    assert trainer.args is args and trainer.processing_class is tok  # passed through, not rebuilt


def _train(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_with_older_arguments_trains_exactly_like_todays(mini_path, tmp_path):
    """An Unsloth notebook's SFTTrainer call (tokenizer=, dataset_text_field=, max_seq_length=, packing=,
    dataset_num_proc=, TrainingArguments with warmup_ratio) against the same run spelled for TRL 1.16."""
    from transformers import TrainingArguments
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict({"text": TEXTS})
    common = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, lr_scheduler_type="linear", seed=3)

    model, tok = lora_model(mini_path)
    new = SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=ds,
        args=SFTConfig(
            output_dir=str(tmp_path / "new"),
            dataset_text_field="text",
            max_length=64,
            warmup_steps=1,
            **common,
            **CPU,
        ),
    )
    new_losses, new_state = _train(new), lora_state(model)

    trl_compat.install()
    model, tok = lora_model(mini_path)
    user_args = TrainingArguments(output_dir=str(tmp_path / "old"), warmup_ratio=0.5, **common, **CPU)
    old = SFTTrainer(
        model=model,
        tokenizer=tok,
        train_dataset=ds,
        dataset_text_field="text",
        max_seq_length=64,
        packing=False,
        dataset_num_proc=1,
        args=user_args,
    )
    assert isinstance(old.args, SFTConfig) and old.args is not user_args
    assert old.args.max_length == 64 and old.args.dataset_text_field == "text" and old.processing_class is tok
    assert not hasattr(user_args, "dataset_text_field")  # the caller's object is left as it was
    old_losses, old_state = _train(old), lora_state(model)

    assert len(new_losses) == 2 and all(math.isfinite(x) for x in new_losses)
    assert old_losses == new_losses
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[n], new_state[n]) for n in new_state)


def test_trainer_keywords_that_contradict_args_are_an_error(mini_path, tmp_path):
    from trl import SFTConfig, SFTTrainer

    trl_compat.install()
    model, tok = lora_model(mini_path)
    ds = Dataset.from_dict({"text": TEXTS})
    args = SFTConfig(output_dir=str(tmp_path), max_length=50, **CPU)
    with pytest.raises(ConfigError, match=r"max_length=64 given to the trainer, but args.max_length is 50"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=ds, max_seq_length=64, args=args)
    with pytest.raises(ConfigError, match="tokenizer= and processing_class= both given"):
        SFTTrainer(model=model, tokenizer=tok, processing_class=tok.__class__(tokenizer_object=tok._tokenizer))


def test_dpo_notebook_arguments(mini_path, tmp_path, caplog):
    """Zephyr DPO notebook: DPOConfig(warmup_ratio=...), DPOTrainer(beta=, tokenizer=, max_length=,
    max_prompt_length=) on TRL 1.16's DPOTrainer."""
    from trl import DPOConfig, DPOTrainer

    trl_compat.install()
    model, tok = lora_model(mini_path)
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        warmup_ratio=0.1,
        learning_rate=1e-3,
        **CPU,
    )
    with caplog.at_level(logging.WARNING, logger="velotune"):
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=args,
            beta=0.25,
            train_dataset=Dataset.from_list(PREFS),
            tokenizer=tok,
            max_length=64,
            max_prompt_length=32,
        )
    assert "max_prompt_length=32 is not a setting of this TRL release" in caplog.text
    assert trainer.args.beta == 0.25 and trainer.args.max_length == 64 and trainer.args.warmup_steps == 0.1
    assert args.beta == 0.1  # the notebook's own object is unchanged
    losses = _train(trainer)
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_orpo_from_trl_with_notebook_arguments(mini_path, tmp_path):
    """Llama 3 ORPO notebook: `from trl import ORPOConfig, ORPOTrainer`, ORPOConfig(max_prompt_length=...)."""
    trl_compat.install()
    from trl import ORPOConfig, ORPOTrainer

    model, tok = lora_model(mini_path)
    trainer = ORPOTrainer(
        model=model,
        train_dataset=Dataset.from_list(PREFS),
        tokenizer=tok,
        args=ORPOConfig(
            output_dir=str(tmp_path),
            max_length=64,
            max_prompt_length=32,
            max_completion_length=32,
            beta=0.1,
            per_device_train_batch_size=2,
            max_steps=1,
            **CPU,
        ),
    )
    assert trainer.processing_class is tok and trainer.args.max_completion_length == 32
    losses = _train(trainer)
    assert len(losses) == 1 and math.isfinite(losses[0])
