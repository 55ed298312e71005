"""The tokenizer in GGUF metadata: vocabulary, scores, token types, merges, special ids, chat template.

Two tokenizer kinds cover the five families:

    byte-level BPE (GPT-2 style: Llama 3, Qwen2, the mini/demo models)  -> tokenizer.ggml.model "gpt2",
        merges, and the pre-tokenizer name llama.cpp knows for the tokenizer's split regex
    SentencePiece BPE (Llama 2, Mistral, Phi-3, Gemma 2)                 -> tokenizer.ggml.model "llama",
        per-piece scores from the merge ranks of tokenizer.json: llama.cpp merges the highest-scoring
        piece first, transformers the lowest-ranked merge, so score = -rank reproduces transformers.
        (The original .model scores are NOT used: they give whitespace pieces such as "\u2581\u2581" a
        score of -1e9, so llama.cpp would split runs of spaces differently from transformers.)

Special tokens and add_bos/add_eos are taken from what the tokenizer actually does when encoding.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf

from velotune.export.atomic import ExportError

T = gguf.TokenType

# Split regexes of the byte-level BPE tokenizers in use -> llama.cpp's pre-tokenizer name
# (llama.cpp src/llama-vocab.cpp implements each of these natively).
_LLAMA3_RE = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_RE = _LLAMA3_RE.replace("\\p{N}{1,3}", "\\p{N}")
_PRE_BY_REGEX = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}


def _flatten(node) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in node else "normalizers"
        return [x for n in node.get(key, []) for x in _flatten(n)]
    return [node]


def bpe_pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    steps = _flatten(tok_json.get("pre_tokenizer"))
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if any(s.get("add_prefix_space") for s in byte_level):
        raise ExportError("byte-level BPE with add_prefix_space=True has no llama.cpp pre-tokenizer")
    if not regexes and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(regexes) == 1 and regexes[0] in _PRE_BY_REGEX:
        return _PRE_BY_REGEX[regexes[0]]
    raise ExportError(
        f"unknown BPE pre-tokenizer {steps!r}: llama.cpp would tokenize differently; "
        "export merged safetensors and convert with llama.cpp's convert_hf_to_gguf.py"
    )


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens that are control tokens in practice."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _added_type(tokenizer, i: int, text: str) -> int:
    added = tokenizer.added_tokens_decoder.get(i)
    if added is not None and (added.special or _looks_special(text)):
        return T.CONTROL
    return T.USER_DEFINED


def _bpe_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        text = reverse[i]
        tokens.append(text)
        types.append(_added_type(tokenizer, i, text) if text in added else T.NORMAL)
    return tokens, types


def _spm_vocab(tokenizer, tok_json: dict, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [T.UNUSED] * n_vocab
    model = tok_json["model"]
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    for text, i in model["vocab"].items():
        if i >= n_vocab:
            continue
        tokens[i] = text.encode()
        scores[i] = -float(rank[text]) if text in rank else 0.0
        is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        types[i] = T.UNKNOWN if text == unk else T.BYTE if is_byte else T.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i >= n_vocab:
            raise ExportError(f"tokenizer token {added.content!r} has id {i} >= the model's vocab_size {n_vocab}")
        if types[i] == T.UNKNOWN:
            continue
        tokens[i], scores[i] = added.content.encode(), -1000.0
        types[i] = _added_type(tokenizer, i, added.content)
        if types[i] == T.USER_DEFINED:
            tokens[i] = added.content.replace("\u2581", " ").encode()
    return tokens, scores, types


def _adds_space_prefix(tok_json: dict) -> bool:
    steps = _flatten(tok_json.get("normalizer")) + _flatten(tok_json.get("pre_tokenizer"))
    for s in steps:
        if s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
            return True
        if (
            s.get("type") == "Metaspace"
            and s.get("prepend_scheme", "always") != "never"
            and s.get("add_prefix_space", True)
        ):
            return True
    return False


def adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Does encoding add BOS / EOS? (measured, not read from flags that tokenizers interpret differently)"""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    longer = len(with_special) > len(plain)
    add_bos = tokenizer.bos_token_id is not None and longer and with_special[0] == tokenizer.bos_token_id
    add_eos = tokenizer.eos_token_id is not None and longer and with_special[-1] == tokenizer.eos_token_id
    return add_bos, add_eos


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> str:
    """Write the tokenizer into `w`; returns "gpt2" or "llama" (the GGUF tokenizer model)."""
    if len(tokenizer) > n_vocab:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embeddings; "
            "resize the model's embeddings before exporting"
        )
    with tempfile.TemporaryDirectory(prefix="velotune-tok-") as d:
        tokenizer.save_pretrained(d)
        path = Path(d) / "tokenizer.json"
        if not path.is_file():
            raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
        tok_json = json.loads(path.read_text(encoding="utf-8"))
        model = tok_json["model"]
        decoder_types = {s.get("type") for s in _flatten(tok_json.get("decoder"))} | {
            (tok_json.get("decoder") or {}).get("type")
        }
        if model["type"] == "BPE" and model.get("byte_fallback"):
            kind = "llama"
            tokens, scores, types = _spm_vocab(tokenizer, tok_json, n_vocab)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(tokens)
            w.add_token_scores(scores)
            w.add_token_types(types)
            w.add_add_space_prefix(_adds_space_prefix(tok_json))
        elif model["type"] == "BPE" and "ByteLevel" in decoder_types:
            kind = "gpt2"
            tokens, types = _bpe_vocab(tokenizer, n_vocab)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(bpe_pre_tokenizer(tok_json))
            w.add_token_list(tokens)
            w.add_token_types(types)
        else:
            raise ExportError(
                f"tokenizer model {model['type']!r} is not supported for GGUF "
                "(byte-level BPE and SentencePiece BPE are)"
            )
        special = gguf.SpecialVocab(d, load_merges=kind == "gpt2", n_vocab=n_vocab)
        special.add_special_token["bos"], special.add_special_token["eos"] = adds_bos_eos(tokenizer)
        for typ in ("bos", "eos", "unk", "pad"):
            tid = getattr(tokenizer, f"{typ}_token_id", None)
            if tid is not None:
                special.special_token_ids[typ] = tid
        special.add_to_gguf(w, quiet=True)
        if special.chat_template is None and tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
    return kind
