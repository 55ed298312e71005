"""The demo's last step: merged safetensors + q8_0 GGUF, then llama.cpp answers one prompt from the GGUF."""

from __future__ import annotations

from pathlib import Path

DEMO_QUESTION = "What is two plus two?"


def answer_with_llama_cpp(gguf_path: Path, tokenizer, question: str = DEMO_QUESTION, max_tokens: int = 32) -> str:
    """Greedy answer from the GGUF through llama-cpp-python, prompted with the model's chat template."""
    from velotune.export.llama_cpp_io import open_gguf

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    llm = open_gguf(gguf_path, n_ctx=256)
    try:
        # the rendered template may already start with BOS (then llama.cpp must not add another)
        has_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
        tokens = llm.tokenize(prompt.encode(), add_bos=not has_bos, special=True)
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1):
            if tok == llm.token_eos() or len(out) >= max_tokens:
                break
            out.append(tok)
        return llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close()


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export_demo(model, tokenizer, out_dir, question: str = DEMO_QUESTION) -> dict:
    """Export the demo model: `out_dir/merged` (safetensors) and `out_dir/gguf/model.Q8_0.gguf` (+ Modelfile),
    then read the GGUF back with llama.cpp and answer `question`. Returns paths, the question and the
    answer (None when llama-cpp-python is not installed: `pip install "velotune[llamacpp]"`)."""
    from velotune.export.gguf_export import save_pretrained_gguf
    from velotune.export.merged import save_pretrained_merged

    out_dir = Path(out_dir)
    merged = save_pretrained_merged(model, out_dir / "merged", tokenizer, "merged_16bit", quiet=True)
    (gguf_path,) = save_pretrained_gguf(model, out_dir / "gguf", tokenizer, "q8_0", quiet=True)
    answer = answer_with_llama_cpp(gguf_path, tokenizer, question) if llama_cpp_available() else None
    return {
        "merged_dir": merged,
        "gguf_path": gguf_path,
        "modelfile": out_dir / "gguf" / "Modelfile",
        "question": question,
        "answer": answer,
    }
