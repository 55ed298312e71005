"""`velotune chat MODEL_DIR`: talk to a model in the terminal, tokens streamed as they come.

MODEL_DIR is a merged model folder (config.json + safetensors) or a LoRA adapter folder
(adapter_config.json: its base model is loaded first, then the adapter on top, unmerged).
The conversation goes through the tokenizer's chat template; generation stops at the end-of-
sequence token and at the template's end-of-turn token. Commands: /exit (or Ctrl-D), /reset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from velotune.errors import ModelLoadError
from velotune.infer.stops import stop_token_ids

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="merged model folder or LoRA adapter folder")
    from velotune.argtypes import non_negative_float, positive_float, positive_int, probability

    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="longest reply in tokens (default 256; less when the context is full)",
    )
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)"
    )
    parser.add_argument("--top-p", type=probability, default=0.9, help="nucleus sampling, in (0, 1] (default 0.9)")
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    parser.add_argument("--system", default=None, help="system message for every conversation")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the weights in NF4 (bitsandbytes)")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: best for the device)")
    parser.add_argument(
        "--max-seq-length",
        type=positive_int,
        default=None,
        help="most positions per conversation (default: the model's own max_position_embeddings; "
        "more scales RoPE); the oldest turns are left out when a conversation grows past it",
    )


def native_positions(model_dir: str | Path, default: int = 4096) -> int:
    """max_position_embeddings from a local model folder's config.json (`default` when it has none)."""
    path = Path(model_dir).expanduser() / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return default
    return int(
        cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings") or default
    )


def load_for_chat(model_dir: str, *, dtype=None, load_in_4bit=False, max_seq_length=None):
    """(model, tokenizer) in inference mode from a merged folder or an adapter folder.

    max_seq_length None: the model's own context (no RoPE scaling); more than that scales RoPE."""
    from velotune.loader import FastLanguageModel

    path = Path(model_dir).expanduser()
    adapter_cfg = path / "adapter_config.json"
    if not adapter_cfg.exists():
        model, tok = FastLanguageModel.from_pretrained(
            str(path), max_seq_length=max_seq_length or native_positions(path), dtype=dtype, load_in_4bit=load_in_4bit
        )
    else:
        from velotune.loader import check_adapter_folder

        base = check_adapter_folder(path).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ModelLoadError(
                f"{adapter_cfg} names no base model (base_model_name_or_path); set it to the base model's folder"
            )
        if base and not Path(base).is_absolute() and (path / base).exists():
            base = str(path / base)
        model, tok = FastLanguageModel.from_pretrained(
            base, max_seq_length=max_seq_length or native_positions(base), dtype=dtype, load_in_4bit=load_in_4bit
        )
        from peft import PeftModel

        if any(
            p.suffix in (".json", ".model", ".jinja") and p.name.startswith(("tokenizer", "chat_template"))
            for p in path.iterdir()
        ):
            from transformers import AutoTokenizer

            from velotune.data.chat_templates import ensure_template_tokens

            tok = AutoTokenizer.from_pretrained(str(path))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            ensure_template_tokens(tok, model)  # the run may have added template tokens (its adapter holds the rows)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer in {model_dir} has no chat template; set one "
            "(velotune.data.chat_templates.get_chat_template) and save it with the model"
        )
    FastLanguageModel.for_inference(model)
    return model, tok


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from velotune.errors import ConfigError
    from velotune.infer.history import MessageTooLong, context_limit, fit_history, read_user_line

    if args.system is not None:
        try:
            args.system.encode("utf-8")
        except UnicodeError:
            raise ConfigError("--system: the text is not UTF-8") from None
    model, tok = load_for_chat(
        args.model_dir, dtype=args.dtype, load_in_4bit=args.load_in_4bit, max_seq_length=args.max_seq_length
    )
    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device
    limit = context_limit(model, args.max_seq_length)
    sampling = (
        dict(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.temperature > 0
        else dict(do_sample=False)
    )
    print(f"velotune chat: {args.model_dir}  ({HELP})", flush=True)
    history: list[dict] = []
    while True:
        print(">>> ", end="", flush=True)
        line, problem = read_user_line(sys.stdin)
        if line is None:  # end of input
            print()
            break
        if problem:
            print(problem, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text}; {HELP})", flush=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            ids, dropped, budget = fit_history(
                tok, args.system, history, limit=limit, max_new_tokens=args.max_new_tokens
            )
        except MessageTooLong as e:
            history.pop()
            print(
                f"(that message is {e.tokens} tokens with the chat template; this model takes {e.limit} "
                "positions in all: shorten it)",
                flush=True,
            )
            continue
        if dropped:
            print(
                f"(context: left out the {dropped} oldest exchange{'s' if dropped > 1 else ''} to fit the "
                f"model's {limit} positions; the system prompt stays)",
                flush=True,
            )
        input_ids = ids["input_ids"].to(device)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=ids["attention_mask"].to(device),
                max_new_tokens=budget,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
                repetition_penalty=args.repetition_penalty,
                streamer=streamer,
                **sampling,
            )
        reply = tok.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
    return 0
