"""Ollama Modelfile whose TEMPLATE and stop parameters are derived from the tokenizer's chat template.

The HF (Jinja) chat template is rendered with sentinel strings as message contents; the text around
the sentinels gives, for each role, the prefix and suffix of its turn, the text before the first
turn (usually BOS) and the generation prompt:

    [user U1, assistant A2, user U3]  ->  HEAD + pre_u U1 suf_u + pre_a A2 suf_a + pre_u U3 suf_u
    [user U1] (+ generation prompt)   ->  ... + GEN

Text that follows an assistant turn only when another turn comes after it (OLMo 2's '\n' after eos) is
taken as part of the assistant's suffix, since an inference prompt never ends with an assistant turn.
The result is written as a Go template over `.Messages` and checked by rendering both templates on a
probe conversation; a chat template that is not a per-role concatenation (e.g. one that moves the
system prompt into a user turn) gets no TEMPLATE line and a warning instead of a wrong one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from velotune.export import gotemplate
from velotune.export.atomic import ExportError, atomic_file
from velotune.export.gguf_vocab import adds_bos_eos

log = logging.getLogger("velotune")

_S = ["\u27e6velotune-sentinel-%d\u27e7" % i for i in range(6)]


@dataclass
class ChatFormat:
    head: str  # before the first turn (e.g. BOS text)
    prefix: dict[str, str]  # role -> text before its content
    suffix: dict[str, str]  # role -> text after its content
    generation: str  # appended to prompt the assistant


def _render(tokenizer, messages, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _between(text: str, a: str | None, b: str | None) -> str:
    start = 0 if a is None else text.index(a) + len(a)
    end = len(text) if b is None else text.index(b, start)
    return text[start:end]


def derive_chat_format(tokenizer) -> ChatFormat:
    """Per-role prefix/suffix of the tokenizer's chat template (raises ValueError if it has none)."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template")
    u, a, u2 = (
        {"role": "user", "content": _S[0]},
        {"role": "assistant", "content": _S[1]},
        {"role": "user", "content": _S[2]},
    )
    three = _render(tokenizer, [u, a, u2], False)
    suf_u = _between(three, _S[2], None)
    suf_a = _between(_render(tokenizer, [u, a], False), _S[1], None)
    pre_a = _between(three, _S[0], _S[1])
    if not pre_a.startswith(suf_u):
        raise ValueError("user turns do not end the same way")
    pre_a = pre_a[len(suf_u) :]
    pre_u = _between(three, _S[1], _S[2])
    if not pre_u.startswith(suf_a):
        raise ValueError("assistant turns do not end the same way")
    pre_u = pre_u[len(suf_a) :]
    before = _between(three, None, _S[0])
    if not before.endswith(pre_u):
        # text written after an assistant turn only when another turn follows (OLMo 2 / Tulu 3: eos + '\n'
        # between turns, eos alone at the end) belongs to the assistant's suffix: a prompt for the model
        # never ends with an assistant turn, so the Go template may always write it
        sep = next((pre_u[:i] for i in range(1, len(pre_u)) if before.endswith(pre_u[i:])), None)
        if sep is None:
            raise ValueError("the first user turn starts differently from later ones")
        suf_a, pre_u = suf_a + sep, pre_u[len(sep) :]
    head = before[: len(before) - len(pre_u)]
    one = _render(tokenizer, [u], False)
    generation = _render(tokenizer, [u], True)[len(one) :]
    prefix, suffix = {"user": pre_u, "assistant": pre_a}, {"user": suf_u, "assistant": suf_a}
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": _S[3]}, u], False)
        if _S[3] in with_sys:
            pre_s = _between(with_sys, None, _S[3])
            mid = _between(with_sys, _S[3], _S[0])
            if pre_s.startswith(head) and mid.endswith(pre_u):
                prefix["system"], suffix["system"] = pre_s[len(head) :], mid[: len(mid) - len(pre_u)]
    except Exception:  # templates that reject a system role (Gemma) simply get none
        pass
    return ChatFormat(head, prefix, suffix, generation)


def _literal(text: str) -> str:
    if "{{" in text:  # the only sequence Go would interpret inside literal text
        return text.replace("{{", '{{ "{{" }}')
    return text


def go_template(fmt: ChatFormat, *, include_head: bool = True) -> str:
    """The Go template (Ollama `.Messages` form) equivalent to `fmt`."""
    parts = [_literal(fmt.head) if include_head else "", "{{ range .Messages }}"]
    for i, role in enumerate(r for r in ("system", "user", "assistant") if r in fmt.prefix):
        parts.append(("{{ if " if i == 0 else "{{ else if ") + f'eq .Role "{role}" }}}}')
        parts.append(f"{_literal(fmt.prefix[role])}{{{{ .Content }}}}{_literal(fmt.suffix[role])}")
    parts.append("{{ end }}{{ end }}")
    parts.append(_literal(fmt.generation))
    return "".join(parts)


def stop_strings(fmt: ChatFormat, tokenizer) -> list[str]:
    """Where an assistant turn ends: its suffix, the start of a user turn, and EOS."""
    stops = [fmt.suffix["assistant"].strip(), fmt.prefix["user"].strip(), tokenizer.eos_token or ""]
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]


def _bos_added_by_runtime(fmt: ChatFormat, tokenizer) -> bool:
    """llama.cpp adds BOS itself when the GGUF says add_bos; a template BOS would then be doubled."""
    return bool(tokenizer.bos_token) and fmt.head == tokenizer.bos_token and adds_bos_eos(tokenizer)[0]


def modelfile_text(tokenizer, gguf_name: str) -> str:
    lines = [f"FROM ./{gguf_name}"]
    try:
        fmt = derive_chat_format(tokenizer)
        template = go_template(fmt, include_head=not _bos_added_by_runtime(fmt, tokenizer))
        probe = [{"role": "system", "content": "Be brief."}] if "system" in fmt.prefix else []
        probe += [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ]
        expected = _render(tokenizer, probe, True)
        if not _bos_added_by_runtime(fmt, tokenizer):
            got = gotemplate.render(template, probe)
        else:
            got = fmt.head + gotemplate.render(template, probe)
        if got != expected:
            raise ValueError("the derived template renders differently from the chat template")
        if '"""' in template:
            raise ValueError('the template contains """, which a Modelfile cannot quote')
        lines.append(f'TEMPLATE """{template}"""')
        lines += [f"PARAMETER stop {json.dumps(s)}" for s in stop_strings(fmt, tokenizer)]
    except ValueError as e:
        log.warning("Modelfile without TEMPLATE (%s); Ollama will use the GGUF's chat template metadata", e)
        if tokenizer.eos_token:
            lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, tokenizer, gguf_name: str) -> Path:
    try:
        text = modelfile_text(tokenizer, gguf_name)
    except Exception as e:  # never lose a finished GGUF over its Modelfile
        raise ExportError(f"could not derive the Modelfile: {e}") from e
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def parse_modelfile(text: str) -> dict:
    """{'from': ..., 'template': ... or None, 'stop': [...]} — for tests and `velotune export` summaries."""
    out = {"from": None, "template": None, "stop": []}
    if 'TEMPLATE """' in text:
        out["template"] = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for line in text.splitlines():
        if line.startswith("FROM "):
            out["from"] = line[5:].strip()
        elif line.startswith("PARAMETER stop "):
            out["stop"].append(json.loads(line[len("PARAMETER stop ") :]))
    return out
