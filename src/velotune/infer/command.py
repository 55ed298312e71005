"""`velotune chat MODEL_DIR`: talk to a model in the terminal, tokens streamed as they come.

MODEL_DIR is a merged model folder (config.json + safetensors) or a LoRA adapter folder
(adapter_config.json: its base model is loaded first, then the adapter on top, unmerged), both
through FastLanguageModel.from_pretrained. The conversation goes through the tokenizer's chat
template; generation stops at the end-of-sequence token and at the template's end-of-turn token.
Decoding is greedy unless sampling is asked for (--temperature > 0 or --top-p) or the model's
generation_config says do_sample. The context is the model's native one (max_position_embeddings)
unless --max-seq-length says otherwise; RoPE is stretched only with --rope-scaling linear.
Commands: /exit (or Ctrl-D), /reset.
"""

from __future__ import annotations

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
        "--temperature",
        type=non_negative_float,
        default=None,
        help="sample at this temperature; 0 = greedy (default: greedy, or the model's generation_config "
        "when it samples)",
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=None,
        help="nucleus sampling, in (0, 1]; asks for sampling (default: the model's generation_config, else 1)",
    )
    parser.add_argument("--repetition-penalty", type=positive_float, default=1.0)
    parser.add_argument("--system", default=None, help="system message for every conversation")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the weights in NF4 (bitsandbytes)")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: best for the device)")
    parser.add_argument(
        "--max-seq-length",
        type=positive_int,
        default=None,
        help="most positions per conversation (default: the model's own max_position_embeddings); the "
        "oldest turns are left out when a conversation grows past it",
    )
    parser.add_argument(
        "--rope-scaling",
        choices=["linear"],
        default=None,
        help="stretch RoPE linearly over --max-seq-length positions when that is more than the model's "
        "native context (default: RoPE as trained, the context capped at the native one)",
    )


def load_for_chat(model_dir: str, *, dtype=None, load_in_4bit=False, max_seq_length=None, rope_scaling=None):
    """(model, tokenizer) in inference mode from a merged folder or an adapter folder.

    max_seq_length None: the model's own context; RoPE is changed only with rope_scaling="linear"."""
    from velotune.loader import FastLanguageModel

    path = Path(model_dir).expanduser()
    model, tok = FastLanguageModel.from_pretrained(
        str(path), max_seq_length=max_seq_length, dtype=dtype, load_in_4bit=load_in_4bit, rope_scaling=rope_scaling
    )
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(
            f"the tokenizer in {model_dir} has no chat template; set one "
            "(velotune.data.chat_templates.get_chat_template) and save it with the model"
        )
    FastLanguageModel.for_inference(model)
    return model, tok


def decoding(model, temperature: float | None, top_p: float | None) -> tuple[dict, str]:
    """generate() settings and a phrase describing them: greedy unless sampling is asked for
    (temperature > 0, or a top_p) or the model's generation_config has do_sample=True, in which case
    its own temperature / top_p / top_k apply where none is given."""
    gc = getattr(model, "generation_config", None)
    if temperature == 0:
        return dict(do_sample=False), "greedy"
    model_samples = bool(getattr(gc, "do_sample", False))
    if temperature is None and top_p is None and not model_samples:
        return dict(do_sample=False), "greedy"
    settings: dict = dict(do_sample=True)
    if temperature is not None:
        settings["temperature"] = temperature
    elif not model_samples:
        settings["temperature"] = 1.0
    if top_p is not None:
        settings["top_p"] = top_p
    elif not model_samples:
        settings["top_p"] = 1.0
    t = settings.get("temperature", getattr(gc, "temperature", None))
    p = settings.get("top_p", getattr(gc, "top_p", None))
    source = " (the model's generation_config)" if model_samples and temperature is None else ""
    return settings, f"sampling at temperature {t}, top-p {p}{source}"


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
        args.model_dir,
        dtype=args.dtype,
        load_in_4bit=args.load_in_4bit,
        max_seq_length=args.max_seq_length,
        rope_scaling=getattr(args, "rope_scaling", None),
    )
    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device
    limit = context_limit(model, args.max_seq_length)
    sampling, described = decoding(model, args.temperature, args.top_p)
    print(f"velotune chat: {args.model_dir}, {described}, {limit} positions  ({HELP})", flush=True)
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
