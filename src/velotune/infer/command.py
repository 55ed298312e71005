"""`velotune chat MODEL_DIR`: talk to a model in the terminal, tokens streamed as they come.

MODEL_DIR is a merged model folder (config.json + safetensors) or a LoRA adapter folder
(adapter_config.json: its base model is loaded first, then the adapter on top, unmerged).
The conversation goes through the tokenizer's chat template; generation stops at the end-of-
sequence token and at the template's end-of-turn token. Commands: /exit (or Ctrl-D), /reset.
"""
from __future__ import annotations

import sys
from pathlib import Path

from velotune.errors import ModelLoadError
from velotune.infer.stops import stop_token_ids

HELP = "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits."


def add_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="merged model folder or LoRA adapter folder")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--system", default=None, help="system message for every conversation")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the weights in NF4 (bitsandbytes)")
    parser.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: best for the device)")
    parser.add_argument("--max-seq-length", type=int, default=4096)


def load_for_chat(model_dir: str, *, dtype=None, load_in_4bit=False, max_seq_length=4096):
    """(model, tokenizer) in inference mode from a merged folder or an adapter folder."""
    from velotune.loader import FastLanguageModel

    path = Path(model_dir).expanduser()
    adapter_cfg = path / "adapter_config.json"
    if not adapter_cfg.exists():
        model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=max_seq_length, dtype=dtype,
                                                       load_in_4bit=load_in_4bit)
    else:
        from velotune.loader import check_adapter_folder

        base = check_adapter_folder(path).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ModelLoadError(f"{adapter_cfg} names no base model (base_model_name_or_path); set it to the base "
                                 "model's folder")
        if base and not Path(base).is_absolute() and (path / base).exists():
            base = str(path / base)
        model, tok = FastLanguageModel.from_pretrained(base, max_seq_length=max_seq_length, dtype=dtype,
                                                       load_in_4bit=load_in_4bit)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        if any(p.suffix in (".json", ".model", ".jinja") and p.name.startswith(("tokenizer", "chat_template"))
               for p in path.iterdir()):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path))
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"the tokenizer in {model_dir} has no chat template; set one "
                             "(velotune.data.chat_templates.get_chat_template) and save it with the model")
    FastLanguageModel.for_inference(model)
    return model, tok


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    model, tok = load_for_chat(args.model_dir, dtype=args.dtype, load_in_4bit=args.load_in_4bit,
                               max_seq_length=args.max_seq_length)
    stops = stop_token_ids(tok, model)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False)
    print(f"velotune chat: {args.model_dir}  ({HELP})", flush=True)
    history: list[dict] = []
    while True:
        print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            print()
            break
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
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + history
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        input_ids = ids["input_ids"].to(device)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=ids["attention_mask"].to(device),
                                 max_new_tokens=args.max_new_tokens, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id, repetition_penalty=args.repetition_penalty,
                                 streamer=streamer, **sampling)
        reply = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})
    return 0
