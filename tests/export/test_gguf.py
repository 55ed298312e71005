"""GGUF files written by velotune, read back by llama.cpp (llama-cpp-python).

Bounds (stated, with the measured values on these toys in brackets):
  f32 GGUF + f32 KV cache, Llama/Phi-3: max|dlogit| <= 1e-5 * max|logit|        [~5e-7]
  f16 GGUF (llama.cpp defaults), each family: max|dlogit| <= tol = 3e-3 * max|logit| [<= 1.2e-3],
      top-1 equal at every position whose top-2 margin exceeds 2 * tol (>= 75% of positions are;
      at the near-ties random weights produce, llama.cpp's pick is within 2 * tol of the best)
  k-quant toy (hidden 256 so that k-quant blocks of 256 fit), vs the fp32 model:
      q8_0: max|dlogit| <= 0.05 * max|logit|, top-1 >= 90% of positions             [0.018, 96%]
      q4_k_m: max|dlogit| <= 0.30 * max|logit|, top-1 >= 60%                          [0.16, 79%]
"""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import torch
from helpers import lora_model
from mini import FAMILIES, VOCAB, mini_config

pytest.importorskip("llama_cpp")
import gguf  # noqa: E402

from velotune.errors import ConfigError  # noqa: E402
from velotune.export import ExportError, attach_export_methods  # noqa: E402
from velotune.export.llama_cpp_io import open_gguf  # noqa: E402
from velotune.export.modelfile import parse_modelfile  # noqa: E402

# Mistral's, Ministral's and Qwen3's mini windows (8) are shorter than the prompts, and llama.cpp's llama
# and qwen3 graphs have no sliding window (the exporter warns): give those toys no window shorter than the
# prompts. llama.cpp skips RoPE on every 4th SmolLM3 layer (hard-coded): the smollm3 toy gets 4 layers,
# NoPE on the last.
OVERRIDES = {
    "mistral": {"sliding_window": 64},
    "ministral": {"sliding_window": 64},
    "ministral3": {"sliding_window": 64},
    "qwen3": {"use_sliding_window": False},
    # llama.cpp's Gemma 3: 5 local : 1 global layers, attention scale from head_dim (window 4 kept)
    "gemma3_text": {"num_hidden_layers": 6, "layer_types": None, "query_pre_attn_scalar": 16},
    "smollm3": {"num_hidden_layers": 4, "no_rope_layer_interval": 4},
    # llama.cpp's OLMo 3 (olmo2 graph): one RoPE base, the sliding layers unscaled (the full layer's YaRN
    # and the (sliding, full) pattern with window 4 kept: without the pattern array llama.cpp assumes
    # 3 sliding : 1 full and these logits are off by ~70%)
    "olmo3": {
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
            "full_attention": mini_config("olmo3").rope_parameters["full_attention"],
        }
    },
}


def prompts(tok) -> list[list[int]]:
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world! How are you today?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    g = torch.Generator().manual_seed(5)
    return [
        tok(chat, add_special_tokens=False)["input_ids"],
        tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"],
        torch.randint(7, VOCAB, (20,), generator=g).tolist(),
    ]


def llama_cpp_logits(path, ids, **kw) -> np.ndarray:
    llm = open_gguf(path, n_ctx=64, logits_all=True, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_logits_match_transformers(family, tmp_path):
    model, tok = lora_model(family, **OVERRIDES.get(family, {}))
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)
    assert path.name == "model.F16.gguf" and (tmp_path / "Modelfile").exists()
    for ids in prompts(tok):
        ref, got = hf_logits(model, ids), llama_cpp_logits(path, ids)
        tol = 3e-3 * np.abs(ref).max()
        assert np.abs(got - ref).max() <= tol
        assert_top1_agrees(ref, got, tol)


def assert_top1_agrees(ref: np.ndarray, got: np.ndarray, tol: float) -> None:
    """Same argmax wherever the reference's top-2 margin exceeds the error bound (2 * tol); at the
    remaining near-ties (random weights have some) llama.cpp's pick must be within 2 * tol of the best."""
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * tol
    pick = got.argmax(-1)
    assert (pick == ref.argmax(-1))[decisive].all()
    assert (ref[np.arange(len(ref)), pick] >= ref.max(-1) - 2 * tol).all()
    assert decisive.mean() >= 0.75  # the check is not vacuous


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_f32_is_exact(family, tmp_path):
    """f32 weights and KV cache: equal to float32 rounding (proves the Q/K permutation, rope factors, fused tensors)."""
    model, tok = lora_model(family)
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "f32", quiet=True, modelfile=False)
    ids = prompts(tok)[2]
    ref, got = hf_logits(model, ids), llama_cpp_logits(path, ids, f32_kv_cache=True)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_quantized_within_bounds(tmp_path):
    model, tok = lora_model("llama", hidden_size=256, intermediate_size=512)
    paths = model.save_pretrained_gguf(tmp_path, tok, ["q8_0", "q4_k_m"], quiet=True)
    assert [p.name for p in paths] == ["model.Q8_0.gguf", "model.Q4_K_M.gguf"]
    assert not list(tmp_path.glob(".*"))  # the 16-bit intermediate is gone
    types = [{t.tensor_type for t in gguf.GGUFReader(p).tensors} for p in paths]
    Q = gguf.GGMLQuantizationType
    assert Q.Q8_0 in types[0] and Q.Q4_K in types[1] and Q.Q6_K in types[1]  # real k-quants, not fallbacks
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, VOCAB, (24,), generator=g).tolist()
    ref = hf_logits(model, ids)
    errors = {}
    for path, (bound, top1) in zip(paths, [(0.05, 0.9), (0.30, 0.6)]):
        got = llama_cpp_logits(path, ids)
        errors[path.name] = np.abs(got - ref).max() / np.abs(ref).max()
        assert errors[path.name] <= bound
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= top1
    assert errors["model.Q8_0.gguf"] < errors["model.Q4_K_M.gguf"]


def test_quantiser_log_only_when_asked_or_failed(tmp_path, capfd, monkeypatch):
    """llama.cpp's quantiser logs every tensor it converts: kept back unless verbose=True, and quoted
    in the error when it fails."""
    import logging

    from velotune.export.gguf_export import llama_cpp_quantize

    # As in a fresh process (llama_cpp.Llama(verbose=False), e.g. open_gguf, raises this level for good).
    monkeypatch.setattr(logging.getLogger("llama-cpp-python"), "level", logging.NOTSET)
    model, tok = lora_model("llama")
    capfd.readouterr()
    model.save_pretrained_gguf(tmp_path / "quiet", tok, "q4_k_m", quiet=True)
    assert capfd.readouterr().err == ""
    model.save_pretrained_gguf(tmp_path / "verbose", tok, "q4_k_m", quiet=True, verbose=True)
    err = capfd.readouterr().err
    assert "llama_model_quantize" in err and "blk.0.attn_q.weight" in err
    assert (tmp_path / "quiet" / "model.Q4_K_M.gguf").stat().st_size == (
        tmp_path / "verbose" / "model.Q4_K_M.gguf"
    ).stat().st_size
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ExportError, match=r"(?s)quantiser failed on not.gguf.*its log ends:\n.*not\.gguf"):
        llama_cpp_quantize(bad, tmp_path / "out.gguf", "q4_k_m")
    assert capfd.readouterr().err == ""


MIXED = (
    "<|system|>Be brief.<|end|><|user|>Hello world!  Two  spaces,\ttab\n\nnew lines; "
    "ünïcödé 日本語 🚀 1234567 don't<|end|><|assistant|>4</s><s>x<pad>"
)


def test_bpe_tokenizer_round_trip(tmp_path):
    model, tok = lora_model("qwen2")
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "q8_0", quiet=True)
    llm = open_gguf(path, n_ctx=64, vocab_only=True)
    try:
        for add in (False, True):
            want = tok(MIXED, add_special_tokens=add)["input_ids"]
            assert llm.tokenize(MIXED.encode(), add_bos=add, special=True) == want
        ids = tok(MIXED, add_special_tokens=False)["input_ids"]
        assert llm.detokenize(ids, special=True).decode() == tok.decode(ids)
    finally:
        llm.close()
    fields = gguf.GGUFReader(path).fields
    assert bytes(fields["tokenizer.chat_template"].parts[-1]).decode() == tok.chat_template
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == tok.eos_token_id
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"


def test_sentencepiece_tokenizer_round_trip(tmp_path):
    """A real SentencePiece model (Mistral's, shipped by mistral-common) through tokenizer.json scores."""
    mistral_common = pytest.importorskip("mistral_common")
    import shutil
    from pathlib import Path

    from transformers import LlamaTokenizer

    from mini import mini_model

    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(tmp_path, legacy=True)
    model = attach_export_methods(mini_model("llama", vocab_size=32000))  # a plain transformers model
    (path,) = model.save_pretrained_gguf(tmp_path / "gguf", tok, "q8_0", quiet=True, modelfile=False)
    text = (
        "<s>[INST] Hello world!  Two  spaces,\ttab\n\nnew lines; ünïcödé 日本語 🚀 1234567 don't</s>x<unk>y   [/INST]"
    )
    llm = open_gguf(path, n_ctx=64, vocab_only=True)
    try:
        for add in (False, True):
            want = tok(text, add_special_tokens=add)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=add, special=True) == want
    finally:
        llm.close()


def test_modelfile_beside_gguf(tmp_path):
    model, tok = lora_model("llama")
    model.save_pretrained_gguf(tmp_path, tok, "q8_0", quiet=True)
    assert tok._ollama_modelfile == (tmp_path / "Modelfile").read_text()  # Unsloth's attribute: the same text
    mf = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert mf["from"] == "./model.Q8_0.gguf" and "<|assistant|>" in mf["template"]
    assert mf["stop"] == ["<|end|>", "<|user|>", "</s>"]


def test_bad_requests_are_clear(tmp_path):
    model, tok = lora_model("llama")
    with pytest.raises(ConfigError, match="q4_k_m"):
        model.save_pretrained_gguf(tmp_path, tok, "q7_x")
    with pytest.raises(ConfigError, match="tokenizer"):
        model.save_pretrained_gguf(tmp_path, None)
    model.get_base_model().config.model_type = "gpt_neox"
    with pytest.raises(ExportError, match="supports llama"):
        model.save_pretrained_gguf(tmp_path, tok)
    assert list(tmp_path.iterdir()) == []


def _regex_bpe_tokenizer(regex: str):
    """A byte-level BPE whose pre-tokenizer is a Split regex, as in Llama 3 and Qwen2 tokenizer.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mini import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["The quick brown fox jumps over the lazy dog. I'm sure you've 1234567 apples."] * 20, trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_regex_bpe_tokenizers(pre, tmp_path):
    """Llama 3 / Qwen2 style pre-tokenizers map to llama.cpp's native ones (digits split 3 by 3 vs 1 by 1)."""
    from velotune.export.gguf_vocab import _PRE_BY_REGEX

    regex = next(r for r, name in _PRE_BY_REGEX.items() if name == pre)
    tok = _regex_bpe_tokenizer(regex)
    model, _ = lora_model("llama")
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "q8_0", quiet=True, modelfile=False)
    assert bytes(gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre
    llm = open_gguf(path, n_ctx=64, vocab_only=True)
    try:
        want = tok(MIXED, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(MIXED.encode(), add_bos=False, special=True) == want
    finally:
        llm.close()


def test_failed_gguf_write_keeps_previous_file(tmp_path, monkeypatch):
    model, tok = lora_model("llama")
    (path,) = model.save_pretrained_gguf(tmp_path, tok, "q8_0", quiet=True)
    before = path.read_bytes()
    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def disk_full(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(ExportError, match="disk is full.*previous file is intact"):
            model.save_pretrained_gguf(tmp_path, tok, "q8_0", quiet=True)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # the half-written file was closed
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile", "model.Q8_0.gguf"]


def test_every_family_gguf_layout_names_known_features():
    from velotune.export.gguf_arch import FEATURES, arch_of
    from velotune.models.families import SPECS

    for spec in SPECS:
        if spec.gguf is not None:
            assert arch_of(spec) in gguf.MODEL_ARCH
            assert set(spec.gguf.features) <= set(FEATURES), spec.name


def test_gemma3_layout_llama_cpp_cannot_express_is_refused(tmp_path):
    """The 2-layer mini (local, global) and its attention scale are not llama.cpp's fixed Gemma 3 layout."""
    model, tok = lora_model("gemma3_text")
    with pytest.raises(ExportError, match="5 sliding layers"):
        model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)
    assert not list(tmp_path.glob("*.gguf"))


def test_smollm3_nope_pattern_llama_cpp_cannot_run_is_refused(tmp_path):
    """llama.cpp hard-codes NoPE on every 4th SmolLM3 layer; the mini model's NoPE on every 2nd would load
    and answer wrongly, so the exporter refuses it with a clear error."""
    model, tok = lora_model("smollm3")  # no_rope_layers [1, 0]
    with pytest.raises(ExportError, match="NoPE on every 4th layer"):
        model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)


def test_olmo3_rope_llama_cpp_cannot_express_is_refused(tmp_path):
    """llama.cpp's OLMo 3 has one RoPE base and derives YaRN's attention factor: the mini's sliding base
    (1e4 vs the full layer's 5e5) and a non-default attention factor would load and answer wrongly."""
    model, tok = lora_model("olmo3")
    with pytest.raises(ExportError, match="sliding layers' RoPE unscaled"):
        model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)
    rope = OVERRIDES["olmo3"]["rope_parameters"]
    model, tok = lora_model(
        "olmo3", rope_parameters={**rope, "full_attention": {**rope["full_attention"], "attention_factor": 1.5}}
    )
    with pytest.raises(ExportError, match="attention_factor=1.5"):
        model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)
    assert not list(tmp_path.glob("*.gguf"))


def test_ministral3_yarn_llama_cpp_cannot_express_is_refused(tmp_path):
    """llama.cpp's mistral3 graph takes the temperature's period from YaRN's original context and assumes
    YaRN mscale 1: other configs would load and answer differently, so the exporter refuses them."""
    rope = dict(mini_config("ministral3").rope_parameters)
    for bad, match in (
        ({**rope, "mscale": 2.0}, "assuming mscale 1"),
        (
            {
                "rope_type": "default",
                "rope_theta": 1e6,
                "llama_4_scaling_beta": 0.5,
                "original_max_position_embeddings": 4,
            },
            "needs YaRN",
        ),
    ):
        model, tok = lora_model("ministral3", sliding_window=64, rope_parameters=bad)
        with pytest.raises(ExportError, match=match):
            model.save_pretrained_gguf(tmp_path, tok, "f16", quiet=True)
        assert not list(tmp_path.glob("*.gguf"))
