"""velotune's decode path (for_inference + model.generate) against stock transformers generate.

Float32 on CPU, mini models of every family: greedy tokens must be identical, token for token,
for batched left-padded prompts, with and without (non-zero) LoRA adapters; the logits of the
prefill and decode steps must match stock forward to 1e-5 relative.
"""

import pytest
import torch

from mini import FAMILIES, VOCAB, mini_model
from velotune.infer import _STATE, for_inference, for_training


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def left_padded(batch=3, seq=10, pads=(0, 3, 6), seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads[:batch]):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


def add_lora(model, seed=5):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(
        names
        & {"q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"}
    )
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapters matter
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return peft_model.eval()


def stock_generate(model, **kw):
    return type(model).generate(model, **kw)


GREEDY = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_stock(family, lora):
    model = mini_model(family).eval()
    if lora:
        model = add_lora(model)
    ids, mask = left_padded()
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    for_inference(model)
    engine = model.__dict__[_STATE]["engine"]
    assert engine is not None, f"{family} should take the fast path"
    got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(got, expected), (got[:, ids.shape[1] :], expected[:, ids.shape[1] :])

    # Logits of prefill and of each decode step == stock forward over the whole sequence (fp32), at the
    # positions generate gives a left-padded row (counted from its first real token: absolute positions
    # matter to Ministral 3's query temperature, not only to RoPE's differences).
    full_mask = torch.cat([mask, torch.ones_like(expected[:, ids.shape[1] :])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = type(model).forward(model, input_ids=expected, attention_mask=full_mask, position_ids=positions).logits
    T = ids.shape[1]
    steps = [engine.prefill(ids, mask)]
    for j in range(4):
        steps.append(engine.decode(expected[:, T + j]))
    ours = torch.stack(steps, dim=1)
    want = ref[:, T - 1 : T + 4]
    rel = (ours - want).norm() / want.norm()
    assert rel < 1e-5, f"relative logit error {rel:.2e}"
    for_training(model)


def test_sampling_processors_and_eos_match_stock():
    """Sampling (temperature, top-k, top-p), repetition penalty and eos stop: same RNG -> same tokens."""
    model = mini_model("llama").eval()
    ids, mask = left_padded()
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=True,
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        repetition_penalty=1.3,
        pad_token_id=0,
    )
    torch.manual_seed(11)
    expected = stock_generate(model, **kw)
    # an eos that some row produces mid-way: rows stop and are padded exactly as stock does
    eos = [int(expected[0, ids.shape[1] + 3]), int(expected[2, ids.shape[1] + 5])]
    torch.manual_seed(11)
    expected_eos = stock_generate(model, eos_token_id=eos, **kw)
    for_inference(model)
    torch.manual_seed(11)
    assert torch.equal(model.generate(**kw), expected)
    torch.manual_seed(11)
    got_eos = model.generate(eos_token_id=eos, **kw)
    assert torch.equal(got_eos, expected_eos)
    assert (got_eos[:, ids.shape[1] :] == 0).any(), "the eos tokens should have stopped a row early"


class Collect:
    """A transformers streamer that records what it is given."""

    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_and_growth_in_chunks(capsys):
    from transformers import TextStreamer

    from mini import mini_tokenizer

    model = mini_model("mistral").eval()  # sliding window 8 < sequence length
    ids, mask = left_padded(batch=1, pads=(0,))
    expected = stock_generate(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    for_inference(model)
    engine = model.__dict__[_STATE]["engine"]
    engine.chunk, engine.reserve_ahead = 8, 0  # 16 slots for the prompt, then 8 more at a time
    stream = Collect()
    got = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, streamer=stream
    )
    assert torch.equal(got, expected)
    assert engine.cache.capacity == 40 and engine.growths >= 3
    assert stream.ended and torch.equal(torch.cat([c.view(1, -1) for c in stream.chunks], dim=1), expected)

    tok = mini_tokenizer()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=30,
        do_sample=False,
        pad_token_id=0,
        streamer=TextStreamer(tok, skip_prompt=True),
    )
    printed = capsys.readouterr().out
    assert printed.strip() == tok.decode(expected[0, ids.shape[1] :]).strip()


def test_generate_in_and_out_of_inference_mode():
    """A generate() under torch.inference_mode() allocates the KV cache and RoPE tables; the next
    generate() outside it (and one growing the cache, and one back inside) reuses them in place."""
    model = mini_model("llama").eval()
    ids, mask = left_padded()
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    longer = stock_generate(model, input_ids=ids, attention_mask=mask, **{**GREEDY, "max_new_tokens": 20})
    for_inference(model)
    engine = model.__dict__[_STATE]["engine"]
    engine.chunk, engine.reserve_ahead = 16, 0  # the cache grows within the longer run
    with torch.inference_mode():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    assert not engine.cache.k[0].is_inference()
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **{**GREEDY, "max_new_tokens": 20}), longer)
    with torch.inference_mode():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)
    assert engine.growths >= 1
    for_training(model)


def test_disabled_and_rescaled_adapters_are_honoured():
    model = mini_model("phi3").eval()
    ids, mask = left_padded()
    base_expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    model = add_lora(model)
    for_inference(model)
    with_lora = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), base_expected)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), with_lora)
    assert not torch.equal(with_lora, base_expected)
    for module in model.modules():  # a new scaling (graphs would be recaptured on CUDA)
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] *= 3
    rescaled = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), rescaled)
    assert not torch.equal(rescaled, with_lora)


def test_for_training_turns_checkpointing_off_without_deprecation_warnings():
    import warnings

    from velotune.memory import enable_checkpointing

    model = add_lora(mini_model("qwen2"))
    enable_checkpointing(model.get_base_model(), True)
    assert model.is_activation_checkpointing
    for_inference(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for_training(model, use_gradient_checkpointing=False)
    assert not model.is_activation_checkpointing and model.training


def test_for_training_restores_everything():
    model = add_lora(mini_model("qwen2"))
    model.train()
    model.base_model.model.model.layers[0].mlp.eval()  # a mixed state must come back as it was
    flags = {n: m.training for n, m in model.named_modules()}
    model.config.use_cache = False
    for_inference(model)
    assert not model.training and model.config.use_cache is True and "generate" in model.__dict__
    engine = model.__dict__[_STATE]["engine"]
    model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=2, pad_token_id=0)
    assert engine.cache is not None
    for_training(model)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model.config.use_cache is False
    assert "generate" not in model.__dict__ and _STATE not in model.__dict__
    assert engine.cache is None  # KV cache and graphs released


def test_beam_search_and_unsupported_models_stay_stock():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = mini_model("llama").eval()
    ids, mask = left_padded()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False, pad_token_id=0)
    expected = stock_generate(model, **kw)
    for_inference(model)
    assert torch.equal(model.generate(**kw), expected)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB)).eval()
    expected = stock_generate(gpt2, input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    for_inference(gpt2)
    assert gpt2.__dict__[_STATE]["engine"] is None
    assert torch.equal(gpt2.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), expected)


@pytest.mark.parametrize("family", ["gemma2"])
def test_fused_triton_decode_path_equals_stock(family):
    """The kernels the GPU decode step uses (norm, RoPE, GLU), run through the Triton interpreter."""
    from velotune.kernels import force_triton

    model = mini_model(family).eval()
    ids, mask = left_padded(batch=2, seq=8, pads=(0, 3))
    expected = stock_generate(
        model, input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    for_inference(model, fused=True)
    with force_triton():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager():
    model = mini_model("llama").cuda().eval()
    ids, mask = left_padded()
    ids, mask = ids.cuda(), mask.cuda()
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    for_inference(model)
    got = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert model.__dict__[_STATE]["engine"].cuda_graphs
    assert torch.equal(got, expected)


def test_a_tokenizer_encoding_as_the_prompt():
    """transformers 5's apply_chat_template(..., return_tensors="pt") returns a BatchEncoding; scripts written for
    transformers 4 pass it where the ids go. It is read as its input_ids and attention_mask."""
    from transformers import BatchEncoding

    model = mini_model("llama").eval()
    ids, mask = left_padded(batch=2, pads=(0, 3))
    expected = stock_generate(model, input_ids=ids, attention_mask=mask, **GREEDY)
    for_inference(model)
    encoding = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(model.generate(encoding, **GREEDY), expected)
    assert torch.equal(model.generate(input_ids=encoding, **GREEDY), expected)
    assert torch.equal(model.generate(inputs=dict(encoding), **GREEDY), expected)
    # an attention_mask given by the caller wins over the encoding's
    ones = torch.ones_like(mask)
    assert torch.equal(
        model.generate(encoding, attention_mask=ones, **GREEDY),
        stock_generate(model, input_ids=ids, attention_mask=ones, **GREEDY),
    )
