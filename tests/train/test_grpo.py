"""TRL's GRPOTrainer with a velotune model against stock TRL + transformers + PEFT, fp32 on the CPU.

What is compared (mini Llama, the same weights and LoRA adapters on both sides, non-zero B):
* scoring and update, given the same completions (each trainer's `_generate_single_turn` returns the
  same token ids): rewards, advantages, old / reference log-probs, then, after the same small change
  of the adapters (so that ratios, clipping and the KL term are not trivial), the GRPO loss and every
  LoRA gradient -- rel. err <= 1e-5. LoRA and QLoRA (the same NF4 weights on both sides), velotune's
  glue installed or not (a plain GRPOTrainer: velotune's stack under TRL's head), beta 0 and > 0,
  (TRL casts a 4-bit model's adapters to bf16; the test casts them back to fp32 on both sides),
  num_iterations 2 (old log-probs), temperature != 1 and an entropy bonus (the entropy's gradient).
* rollouts: velotune's decode engine against stock generate in TRL's own `_generate_single_turn`:
  greedy completions token for token, sampled ones from the same seed, with an extra stop token.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

from mini import VOCAB, save_mini_model
from velotune import FastLanguageModel
from velotune.infer.rollout import fast_generate_calls
from velotune.models.logprob_head import serves_logprob_head
from velotune.train import grpo
from velotune.train.trl_glue import velotune_trainer_class

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["The quick brown", "Hello world! How", "Question: what is", "velotune fine-tunes"]
EOS = 2  # the mini tokenizer's </s>


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # intermediate_size a multiple of bitsandbytes' 64-element block (tests/quant/test_quant_qlora.py says why)
    return save_mini_model("llama", tmp_path_factory.mktemp("grpo"), intermediate_size=128)


def reward_len(completions, **kw):
    return [float(len(c)) for c in completions]


def reward_vowels(completions, **kw):
    return [float(sum(ch in "aeiou" for ch in c)) for c in completions]


def _args(tmp_path, name, device="cpu", **kw):
    defaults = dict(
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        use_cpu=device == "cpu",
        bf16=False,
        report_to="none",
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        learning_rate=1e-2,
    )
    return GRPOConfig(output_dir=str(tmp_path / name), **{**defaults, **kw})


def _adapters(model, seed: int = 7) -> None:
    """Random A and B (PEFT starts B at zero) drawn by parameter name: the same on every model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _velotune_model(path, qlora: bool, dtype=torch.float32, device="cpu"):
    model, tok = FastLanguageModel.from_pretrained(path, dtype=dtype, load_in_4bit=qlora, max_seq_length=128)
    if not qlora:  # (from_pretrained puts a 16/32-bit model on the GPU where there is one)
        model = model.to(device)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=TARGETS)
    _adapters(model)
    return model.train(), tok


def _stock_model(path, qlora: bool, device="cpu"):
    if qlora:  # the same NF4 weights (bitsandbytes' quantiser), stock transformers forward
        model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.float32, load_in_4bit=True, fast=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    _adapters(model)
    return model.train(), AutoTokenizer.from_pretrained(path)


def _trainer(model, tok, args, cls=GRPOTrainer):
    ds = Dataset.from_dict({"prompt": PROMPTS})
    return cls(model=model, reward_funcs=[reward_len, reward_vowels], args=args, train_dataset=ds, processing_class=tok)


def _fp32_adapters(trainer) -> None:
    """TRL casts a 4-bit model's adapters to bf16 in __init__ (its QLoRA recipe); the fp32 comparison
    casts them back on both sides (the values, bf16-rounded, stay the same on both)."""
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()


def _fixed_completions(trainer, completions):
    """This trainer instance 'generates' the given token ids (the rest of TRL's pipeline runs as is)."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        assert len(prompt_ids) == len(completions)
        return [list(c) for c in completions], None

    trainer._generate_single_turn = generate


def _nudge(model, seed: int = 11) -> None:
    """The same small change of every adapter on both sides: the policy moves away from the sampling one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                g = torch.Generator().manual_seed(seed + sum(map(ord, name)))
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.device, p.dtype))


def _rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _step(trainer, completions):
    """Score the completions (TRL's _prepare_inputs), nudge the adapters, then the loss and its gradients."""
    _fixed_completions(trainer, completions)
    trainer.current_gradient_accumulation_steps = 1  # (set by train()'s loop)
    batch = [{"prompt": PROMPTS[i]} for i in (0, 0, 1, 1)]
    inputs = trainer._prepare_inputs(batch)
    _nudge(trainer.model)
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return inputs, loss.detach(), grads


def _completions(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = (6, 3, 5, 1)  # rows 1 and 3 end on EOS, the others are cut at max_completion_length
    rows = [torch.randint(7, VOCAB, (n,), generator=g).tolist() for n in lengths]
    rows[1][-1] = EOS
    rows[3][-1] = EOS
    return rows


CASES = {
    "lora": dict(qlora=False, install=True, kw={}),
    "lora-plain-trainer": dict(qlora=False, install=False, kw={}),
    "lora-kl-iterations-entropy": dict(
        qlora=False, install=True, kw=dict(beta=0.04, num_iterations=2, temperature=0.7, entropy_coef=0.05)
    ),
    "qlora": dict(qlora=True, install=True, kw=dict(beta=0.04)),
}


@pytest.mark.parametrize(
    "case,device",
    [(case, "cpu") for case in CASES] + [pytest.param("lora-kl-iterations-entropy", "cuda", marks=pytest.mark.gpu)],
)
def test_scoring_loss_and_lora_gradients_equal_stock_trl(llama_dir, tmp_path, monkeypatch, case, device):
    """On the GPU (fp32): TRL's head runs its Triton kernel and velotune's its own."""
    c = CASES[case]
    if c["qlora"]:
        pytest.importorskip("bitsandbytes")
    completions = _completions()
    stock_model, stock_tok = _stock_model(llama_dir, c["qlora"], device)
    device = stock_model.device.type  # (a 4-bit model is where bitsandbytes put it)
    stock = _trainer(stock_model, stock_tok, _args(tmp_path, "stock", device, **c["kw"]))
    _fp32_adapters(stock)
    s_inputs, s_loss, s_grads = _step(stock, completions)

    model, tok = _velotune_model(llama_dir, c["qlora"], device=device)
    assert model.device.type == device
    ours = _trainer(model, tok, _args(tmp_path, "velotune", device, **c["kw"]))
    _fp32_adapters(ours)
    if c["install"]:
        assert grpo.install(ours) == {"rollouts": True, "logprob_head": True}
    head_calls = _count_head_calls(monkeypatch)
    v_inputs, v_loss, v_grads = _step(ours, completions)
    # scoring passes: the loss's, old log-probs (num_iterations > 1), reference log-probs (beta > 0)
    passes = 1 + (c["kw"].get("num_iterations", 1) > 1) + (c["kw"].get("beta", 0.0) > 0)
    assert head_calls["n"] == (passes if c["install"] else 0)

    assert torch.equal(v_inputs["completion_ids"], s_inputs["completion_ids"])
    assert torch.equal(v_inputs["completion_mask"], s_inputs["completion_mask"])
    for metric in ("rewards/reward_len/mean", "rewards/reward_vowels/mean", "reward_std"):
        assert ours._metrics["train"][metric] == stock._metrics["train"][metric], metric
    assert _rel(v_inputs["advantages"], s_inputs["advantages"]) <= 1e-6
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        assert (key in v_inputs) == (key in s_inputs)
        if s_inputs.get(key) is not None:
            assert _rel(v_inputs[key], s_inputs[key]) <= 1e-5, key
    assert abs(v_loss.item() - s_loss.item()) <= 1e-5 * abs(s_loss.item()) and abs(s_loss.item()) > 1e-4
    assert v_grads.keys() == s_grads.keys() and len(v_grads) == 2 * 2 * len(TARGETS)
    for name in s_grads:
        assert s_grads[name].abs().max() > 0, name
        assert _rel(v_grads[name], s_grads[name]) <= 1e-5, name
    assert (
        _rel(torch.tensor(ours._metrics["train"]["entropy"]), torch.tensor(stock._metrics["train"]["entropy"])) <= 1e-5
    )


def _count_head_calls(monkeypatch):
    """A spy on velotune's head kernel: how many scoring passes it served."""
    from velotune.kernels import fused_linear_logprob as flp

    calls = {"n": 0}
    original = flp._FusedLinearLogprob.apply

    def apply(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(flp._FusedLinearLogprob, "apply", apply)
    return calls


def _prompt_ids(tok):
    return [tok(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[0], PROMPTS[2], PROMPTS[2])]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_rollouts_on_the_engine_equal_stock_generate(llama_dir, tmp_path, mode):
    """TRL's own _generate_single_turn: stock generate on the stock model, velotune's engine on ours."""
    gen = {"do_sample": False} if mode == "greedy" else {}
    kw = dict(max_completion_length=8, temperature=0.9, top_k=50, generation_kwargs=gen)
    stock_model, stock_tok = _stock_model(llama_dir, qlora=False)
    model, tok = _velotune_model(llama_dir, qlora=False)
    ids = _prompt_ids(tok)

    def rollouts(trainer):
        torch.manual_seed(1234)
        completions, logprobs = trainer._generate_single_turn(ids, None, {}, 2)
        return completions

    # A stop token the greedy rollout of the first prompt reaches: stop tokens are exercised
    stock = _trainer(stock_model, stock_tok, _args(tmp_path, "stock", **kw))
    probe = rollouts(stock)
    stop = probe[0][2]
    for m in (stock_model, model):
        m.generation_config.eos_token_id = [EOS, stop]
    stock = _trainer(stock_model, stock_tok, _args(tmp_path, "stock", **kw))
    ours = _trainer(model, tok, _args(tmp_path, "velotune", **kw), cls=velotune_trainer_class(GRPOTrainer))
    assert serves_logprob_head(model.get_base_model())
    expected, got = rollouts(stock), rollouts(ours)
    assert fast_generate_calls(model) == 1 and model.training
    assert got == expected
    assert any(len(c) < 8 and c[-1] == stop for c in got)  # a completion stopped at the extra stop token
    if mode == "sampled":
        assert len({tuple(c) for c in got}) > 1


def test_train_step_keeps_offloaded_checkpointing_and_uninstall_restores(llama_dir, tmp_path):
    """A real train() step: TRL turns checkpointing off around generation and scoring and back on;
    velotune's offloaded checkpointing is armed again after it. uninstall puts TRL's paths back."""
    model, tok = _velotune_model(llama_dir, qlora=False)
    trainer = _trainer(model, tok, _args(tmp_path, "train", gradient_checkpointing=True))
    base = model.get_base_model()
    trl_forward = base.__dict__["forward"]
    grpo.install(trainer)
    assert base.__dict__["forward"] is not trl_forward and "generate" in model.__dict__
    trainer.train()
    layers = base.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(getattr(layer._gradient_checkpointing_func, "velotune_offloaded", False) for layer in layers)
    assert fast_generate_calls(model) == 1
    assert grpo.uninstall(trainer) and not grpo.uninstall(trainer)
    assert base.__dict__["forward"] is trl_forward and "generate" not in model.__dict__


def test_install_refuses_other_trainers(llama_dir):
    from velotune.errors import ConfigError

    with pytest.raises(ConfigError, match="expected a trl.GRPOTrainer"):
        grpo.install(object())


@pytest.mark.gpu
def test_gpu_bf16_grpo_steps(llama_dir, tmp_path):
    """bf16 on CUDA, velotune's trainer class: two real steps, rollouts on the engine (its CUDA graph reused
    by the second step), velotune's head, finite losses, adapters moved."""
    model, tok = _velotune_model(llama_dir, qlora=False, dtype=torch.bfloat16, device="cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = _args(tmp_path, "gpu", "cuda", bf16=True, max_steps=2, max_completion_length=16)
    trainer = _trainer(model, tok, args, cls=velotune_trainer_class(GRPOTrainer))
    trainer.train()
    engine = model.__dict__["_velotune_fast_generate"]["engine"]
    assert fast_generate_calls(model) == 2 and engine.cuda_graphs and len(engine._graphs) == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
