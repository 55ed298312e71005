"""Response-only labels: found by token ids, equal to the template's exact assistant mask, on real
TRL SFTTrainer data sets; rows left without trainable tokens are reported with the reason."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mini import mini_model, mini_tokenizer

from velotune.data.chat_templates import CHAT_TEMPLATES, get_chat_template
from velotune.data.masking import derive_parts, response_labels, train_on_responses_only
from velotune.errors import DataError

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "The answer is four."},
    {"role": "user", "content": "Thanks.\nBye"},
    {"role": "assistant", "content": "\nSure thing:\n- bye (for now)"},
]


def _quiet(fn, *a, **k):
    logging.disable(logging.WARNING)
    try:
        return fn(*a, **k)
    finally:
        logging.disable(logging.NOTSET)


def _exact_labels(tok, conv):
    out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return out["input_ids"], [t if m else -100 for t, m in zip(out["input_ids"], out["assistant_masks"])]


def _check_templates(make_tok, names):
    for name in names:
        tok = _quiet(get_chat_template, make_tok(), name)
        parts = derive_parts(tok)
        for conv in (MULTI_TURN, MULTI_TURN[1:5]):
            ids, expected = _exact_labels(tok, conv)
            assert sum(v != -100 for v in expected) > 3
            assert response_labels(ids, parts=parts) == expected, name


def test_auto_parts_equal_generation_mask_every_template():
    _check_templates(mini_tokenizer, CHAT_TEMPLATES)


@pytest.fixture(scope="module")
def mistral_sentencepiece(request, tmp_path_factory):
    """Mistral's real SentencePiece tokenizer (shipped by mistral-common), converted once and cached."""
    import mistral_common
    from transformers import AutoTokenizer, LlamaTokenizer

    cache_plugin = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    cache = Path(
        cache_plugin.mkdir("velotune-mistral-v1-tokenizer")
        if cache_plugin
        else tmp_path_factory.mktemp("mistral-v1-tokenizer")
    )
    if not (cache / "tokenizer.json").exists():
        src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        (cache / "tokenizer.model").write_bytes(src.read_bytes())
        LlamaTokenizer.from_pretrained(cache).save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


def test_auto_parts_on_a_real_sentencepiece_tokenizer(mistral_sentencepiece):
    assert len(mistral_sentencepiece) == 32000
    # the formats whose markers are plain text (SentencePiece merges spaces into words there). One tokenizer
    # takes them in turn (a copy costs seconds): the eos-based formats first, llama-3 (which remaps eos) last.
    _check_templates(
        lambda: mistral_sentencepiece,
        ["mistral", "alpaca", "vicuna", "zephyr", "default", "olmo-2", "mistral-v7-tekken", "llama-3"],
    )


def test_explicit_parts_unsloth_style():
    tok = _quiet(get_chat_template, mini_tokenizer(), "llama-3")
    ids, expected = _exact_labels(tok, MULTI_TURN[1:5])
    labels = response_labels(
        ids,
        tok,
        instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
    )
    assert labels == expected
    with pytest.raises(DataError, match="response_part is required"):
        response_labels(ids, tok, instruction_part="<|start_header_id|>user")


def test_needs_a_chat_template():
    tok = mini_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template.*get_chat_template"):
        derive_parts(tok)


def _sft_trainer(tmp_path, rows, max_length=64):
    import datasets
    from trl import SFTConfig, SFTTrainer

    model = mini_model("llama")
    tok = _quiet(get_chat_template, mini_tokenizer(), "chatml", model=model)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_length=max_length,
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        dataset_num_proc=None,
        save_strategy="no",
    )
    ds = datasets.Dataset.from_list([{"messages": r} for r in rows])
    return SFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok), tok


def test_sft_trainer_labels_and_empty_rows(tmp_path, caplog):
    long_prompt = [
        {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6},
        {"role": "assistant", "content": "ok"},
    ]
    rows = [MULTI_TURN, MULTI_TURN[1:3], long_prompt, MULTI_TURN[3:5]]
    trainer, tok = _sft_trainer(tmp_path, rows, max_length=40)
    assert len(trainer.train_dataset) == 4  # TRL kept every row (all labels = input_ids before masking)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        train_on_responses_only(trainer)
    report = trainer.velotune_data_report
    assert report.skipped == {"no_trainable_tokens": [2, 2]}  # row 2 of train and of eval
    assert "truncation at max_length=40 cut the row before any assistant reply" in report.summary()
    assert "no trainable token" in caplog.text and "train row 2" in caplog.text
    ds = trainer.train_dataset
    assert len(ds) == 3
    for row, conv in zip(ds, (rows[0], rows[1], rows[3])):
        ids, expected = _exact_labels(tok, conv)
        assert row["input_ids"] == ids[:40] and row["labels"] == expected[:40]
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] != -100).sum() > 0
    assert set(batch["labels"][batch["labels"] != -100].tolist()) <= set(batch["input_ids"].flatten().tolist())


def test_all_rows_empty_is_an_error_and_batches_are_guarded(tmp_path, caplog):
    rows = [
        [
            {"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 6},
            {"role": "assistant", "content": "ok"},
        ]
    ] * 2
    trainer, _ = _sft_trainer(tmp_path, rows, max_length=30)
    with pytest.raises(DataError, match="2 of 2 train rows have no trainable token.*No row is left"):
        train_on_responses_only(trainer)
    trainer, _ = _sft_trainer(tmp_path, rows + [MULTI_TURN[3:5]], max_length=30)
    train_on_responses_only(trainer, on_empty="keep")
    with caplog.at_level(logging.WARNING, logger="velotune"):
        trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert "a batch has no trainable token" in caplog.text and "train row 0 (truncation" in caplog.text
