"""Random-weight mini models of every supported family, built from real transformers configs.

    path = save_mini_model("llama", tmp_path)          # folder with config, safetensors, tokenizer
    model, tok = FastLanguageModel.from_pretrained(path, dtype=torch.float32)

Shapes are tiny (hidden 64, 2 layers) so everything, the Triton interpreter included, runs on CPU.
Sliding windows are shorter than the test sequences so that masking is really exercised.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "phi3",
    "gemma2",
    "qwen3",
    "gemma3_text",
    "ministral",
    "granite",
    "smollm3",
    "olmo2",
    "ministral3",
    "olmo3",
)
VOCAB = 384

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def mini_config(family: str, **overrides):
    """A real transformers config of `family` at toy size."""
    import transformers as tf

    kw = dict(_COMMON)
    if family == "llama":
        cls = tf.LlamaConfig
        kw.update(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        )
    elif family == "mistral":
        cls = tf.MistralConfig
        kw.update(sliding_window=8, head_dim=16)
    elif family == "qwen2":
        cls = tf.Qwen2Config
        kw.update(use_sliding_window=False)
    elif family == "phi3":
        cls = tf.Phi3Config
        kw.update(num_key_value_heads=4)
    elif family == "gemma2":
        cls = tf.Gemma2Config
        kw.update(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )
    elif family == "qwen3":  # head_dim != hidden / heads, GQA, tied embeddings, a sliding upper layer
        cls = tf.Qwen3Config
        kw.update(head_dim=24, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    elif family == "gemma3_text":  # local (window 4, base 1e4) then global (base 1e6, linear x8) layer;
        cls = tf.Gemma3TextConfig  # attention scale from query_pre_attn_scalar != head_dim; tied embeddings
        kw.update(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        )
    elif family == "ministral":  # head_dim != hidden / heads, GQA, a sliding then a full-attention layer
        cls = tf.MinistralConfig
        kw.update(head_dim=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    elif family == "granite":  # Granite 3's four scalars, attention scale 1 / head_dim, tied embeddings
        cls = tf.GraniteConfig
        kw.update(
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=1 / 16,
            logits_scaling=8.0,
            tie_word_embeddings=True,
        )
    elif family == "smollm3":  # NoPE on every 2nd layer here (layer 1 of 2; SmolLM3-3B: every 4th), tied
        cls = tf.SmolLM3Config
        kw.update(no_rope_layer_interval=2, tie_word_embeddings=True)
    elif family == "olmo2":  # post-norms, q/k norm over the whole projection, GQA
        cls = tf.Olmo2Config
        kw.update(initializer_range=0.05)
    elif family == "olmo3":  # OLMo 2's post-norms and whole-projection q/k norm, GQA, a sliding (window 4,
        cls = tf.Olmo3Config  # plain RoPE base 1e4) then a full-attention layer (base 5e5, YaRN as OLMo 3 7B)
        kw.update(
            initializer_range=0.05,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {
                    "rope_type": "yarn",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "original_max_position_embeddings": 32,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
            },
        )
    elif family == "ministral3":  # head_dim != hidden / heads, GQA, tied, YaRN, a window on every layer, and
        cls = _ministral3_config()  # the query temperature from position 4 on (period 4: in every test batch)
        kw.update(
            head_dim=24,
            sliding_window=8,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 64.0,
                "original_max_position_embeddings": 4,
                "max_position_embeddings": 256,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.5,
            },
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    kw.update(overrides)
    return cls(**kw)


def _ministral3_config():
    """transformers' Ministral3Config, or a skip where the installed release has none."""
    import pytest
    import transformers as tf

    if not hasattr(tf, "Ministral3Config"):
        pytest.skip(f"transformers {tf.__version__} has no Ministral 3 (model_type ministral3)")
    return tf.Ministral3Config


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A byte-level BPE trained on a few sentences (well under a second), with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world! How are you today?",
        "velotune fine-tunes language models fast and exactly.",
        "0123456789 + - * / = ( ) [ ] { }",
        "Question: what is two plus two? Answer: four.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def mini_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def mini_model(family: str, dtype=torch.float32, seed: int = 0, **overrides):
    """A random-weight transformers model (stock class) of `family`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = mini_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weights so a wrong norm formula shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_mini_model(family: str, folder: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a mini model + tokenizer (safetensors) to `folder/family` and return the path."""
    path = Path(folder) / family
    model = mini_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    mini_tokenizer().save_pretrained(path)
    return path


def fixed_batch(batch: int = 2, seq: int = 12, seed: int = 1, pad_last: int = 3):
    """input_ids/attention_mask/labels with right padding on the last row and some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, -pad_last:] = 0
        ids[-1, -pad_last:] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :2] = -100  # an ignored "prompt"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def same_trainables(ours, stock) -> None:
    """Give `ours` non-zero LoRA B (so every gradient is exercised) and copy each of its trainable
    parameters into `stock`'s parameter of the same name (both PEFT models of the same base)."""
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn_like(p))
        stock_params = dict(stock.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                stock_params[name].copy_(p)
