"""A tiny renderer for the Go-template subset velotune writes into Ollama Modelfiles.

Supported: literal text, `{{ range .Messages }} ... {{ end }}`, `{{ if eq .Role "r" }}`,
`{{ else if eq .Role "r" }}`, `{{ else }}`, `{{ end }}`, `{{ .Content }}` and string literals
`{{ "text" }}`. Anything else raises ValueError, so a template using more than this subset is caught
instead of silently rendered wrong. Trim markers (`{{-`) are not used by velotune and not supported.
"""

from __future__ import annotations

import json
import re

_ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        if m.start() > pos:
            out.append(("text", template[pos : m.start()]))
        out.append(("action", m.group(1).strip()))
        pos = m.end()
    if pos < len(template):
        out.append(("text", template[pos:]))
    return out


def _parse(tokens, i: int, stop: tuple[str, ...]):
    """-> (nodes, index of the stopping action, the stopping action)."""
    nodes = []
    while i < len(tokens):
        kind, val = tokens[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
            continue
        if val.startswith("-") or val.endswith("-"):
            raise ValueError("trim markers are not supported")
        if any(val == s or val.startswith(s + " ") for s in stop):
            return nodes, i, val
        if val == ".Content":
            nodes.append(("content",))
            i += 1
        elif val.startswith('"'):
            nodes.append(("text", json.loads(val)))
            i += 1
        elif val == "range .Messages":
            body, i, _ = _parse(tokens, i + 1, ("end",))
            nodes.append(("range", body))
            i += 1
        elif val.startswith("if "):
            branches, i = _parse_if(tokens, i)
            nodes.append(("if", branches))
        else:
            raise ValueError(f"unsupported action {{{{ {val} }}}}")
    if stop:
        raise ValueError(f"missing {{{{ {stop[0]} }}}}")
    return nodes, i, None


def _cond(expr: str):
    m = re.fullmatch(r'eq \.Role ("[^"]*")', expr)
    if not m:
        raise ValueError(f"unsupported condition {expr!r}")
    return json.loads(m.group(1))


def _parse_if(tokens, i: int):
    branches = []
    cond = _cond(tokens[i][1][3:].strip())
    i += 1
    while True:
        body, i, stop = _parse(tokens, i, ("else", "end"))
        branches.append((cond, body))
        if stop == "end":
            return branches, i + 1
        rest = stop[4:].strip()
        cond = _cond(rest[3:].strip()) if rest.startswith("if ") else None
        i += 1


def _render(nodes, messages, msg, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "content":
            out.append(msg["content"])
        elif node[0] == "range":
            for m in messages:
                _render(node[1], messages, m, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond is None or (msg is not None and msg["role"] == cond):
                    _render(body, messages, msg, out)
                    break


def render(template: str, messages: list[dict]) -> str:
    """Render `template` for `messages` ([{"role", "content"}]) as Ollama would."""
    nodes, _, _ = _parse(_tokens(template), 0, ())
    out: list[str] = []
    _render(nodes, messages, None, out)
    return "".join(out)
