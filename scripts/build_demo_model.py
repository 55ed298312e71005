"""Rebuild the model that ships with `velotune demo` (src/velotune/demo/assets/).

    python scripts/build_demo_model.py            # ~7 min on 2 idle CPU cores (0.3 s a step)

Time goes into the training steps (tokenizer ~1 s, one recall check ~2 s). Two torch threads are ~1.8x
faster than one on idle cores, but next to other torch processes their per-op barriers wait for
descheduled threads and a step can take ten times longer: the first (1M-parameter) build's 816 s for
200 steps was most likely such a run (0.15 s a step idle); the shipped build took 653 s beside a test run.

1. Trains a byte-level BPE tokenizer (`tokenizers`) on the text this repo ships (scripts/demo_world.py
   and scripts/demo_corpus/general.txt), with special tokens and a chat template (Zephyr layout:
   `<|user|>...</s><|assistant|>...</s>`, assistant content inside `{% generation %}` markers).
2. Pretrains a small Llama-architecture model (LlamaConfig, ~2.7M parameters, 6 layers, tied embeddings)
   on plain sentences stating every fact of the demo world: next-token prediction only, no chat format.
   One epoch of that text is only ~3 batches, so 1200 steps are ~420 epochs (new phrasings and order
   each time); fact recall passes 95% around step 300 and stays at ~99-100%.
3. Saves config.json, generation_config.json, model.safetensors and the tokenizer files atomically
   (written to a temporary folder next to the target, then renamed).

Everything is seeded; the same torch build and thread count give the same weights.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import demo_world  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "src" / "velotune" / "demo" / "assets"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr's layout. The whole assistant turn, its closing </s> included, is what `assistant_only_loss`
# trains on, so the model learns to stop; </s> is also the end-of-document token of pretraining.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

MODEL = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=True)


def tokenizer_corpus() -> list[str]:
    """All text the tokenizer sees: a few epochs of the pretraining text plus every question."""
    text = [doc for seed in range(3) for doc in demo_world.pretraining_documents(seed)]
    text += [q for f in demo_world.facts() for q in f["questions"]]
    return text


def build_tokenizer(vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MODEL["max_position_embeddings"], padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_stream(tokenizer, seed: int) -> list[int]:
    """One epoch of pretraining text as token ids: `<s> document </s>` after one another."""
    ids: list[int] = []
    for doc in demo_world.pretraining_documents(seed):
        ids += [tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False), tokenizer.eos_token_id]
    return ids


def batches(tokenizer, seq_len: int, batch_size: int):
    """Endless [batch_size, seq_len] chunks; each epoch has new phrasings and a new order."""
    epoch, buf = 0, []
    while True:
        buf += token_stream(tokenizer, seed=1000 + epoch)
        epoch += 1
        while len(buf) >= seq_len * batch_size:
            chunk, buf = buf[:seq_len * batch_size], buf[seq_len * batch_size:]
            yield torch.tensor(chunk).view(batch_size, seq_len), epoch


@torch.no_grad()
def recall(model, tokenizer) -> float:
    """Share of facts whose answer word the model completes greedily from the answer's start.

    E.g. prompt "<s>The capital of France is" must continue with "Paris".
    """
    model.eval()
    hits = 0
    all_facts = demo_world.facts()
    for f in all_facts:
        prefix = f["answer"][: f["answer"].rindex(f["target"])].rstrip()
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prefix, add_special_tokens=False)]])
        target = tokenizer.encode(" " + f["target"], add_special_tokens=False)
        out = model.generate(ids, max_new_tokens=len(target), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        hits += out[0, ids.shape[1]:].tolist() == target
    model.train()
    return hits / len(all_facts)


def pretrain(tokenizer, steps: int, seq_len: int, batch_size: int, lr: float, seed: int, model_args: dict,
             eval_every: int = 0):
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model_args)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step):  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    data = batches(tokenizer, seq_len, batch_size)
    bar = tqdm(range(steps), desc=f"pretraining {n_params / 1e6:.2f}M params", unit="step")
    for step in bar:
        x, epoch = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            bar.write(f"step {step + 1}: fact recall {recall(model, tokenizer):.1%}")
    return model


def save(model, tokenizer, target: Path) -> None:
    """Write everything into a temporary sibling folder, then swap it in."""
    from transformers import GenerationConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".assets-", dir=target.parent))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=32)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=MODEL["hidden_size"])
    p.add_argument("--intermediate-size", type=int, default=MODEL["intermediate_size"])
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=MODEL["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=MODEL["num_key_value_heads"])
    p.add_argument("--eval-every", type=int, default=0, help="print fact recall every N steps (0: only at the end)")
    args = p.parse_args()
    model_args = {**MODEL, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                  "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                  "num_key_value_heads": args.kv_heads}

    torch.set_num_threads(args.threads)
    t0 = time.time()
    tokenizer = build_tokenizer(args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens, eos {tokenizer.eos_token!r}")
    model = pretrain(tokenizer, args.steps, args.seq_len, args.batch_size, args.lr, args.seed, model_args,
                     eval_every=args.eval_every)
    acc = recall(model, tokenizer)
    print(f"fact recall from plain-text prompts: {acc:.1%} of {len(demo_world.facts())} facts")
    save(model, tokenizer, args.out)
    (args.out / "build_info.json").write_text(json.dumps(dict(
        script="scripts/build_demo_model.py", args={k: str(v) for k, v in vars(args).items() if k != "out"},
        torch=torch.__version__, parameters=sum(p.numel() for p in model.parameters()),
        fact_recall=round(acc, 4), seconds=round(time.time() - t0)), indent=2) + "\n")
    print(f"saved to {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
