"""velotune vs stock transformers + PEFT, CPU float32: identical weights and identical non-zero LoRA
weights, AdamW on a fixed batch with padding and ignored labels. Every step's loss and every trainable
gradient must match to relative error 1e-5 (per-tensor norm: ||g_fast - g_stock|| / ||g_stock||).

Over many AdamW steps fp32 rounding differences are amplified (Adam turns tiny gradient entries into
full-size updates): free-running, stock SDPA and stock eager attention drift apart by ~1e-4 in gradient
norm after 20 rsLoRA steps. So gradients are compared step by step at the same weights (after each
step the fast model takes the stock model's weights), and the free-running loss curves separately.
"""

import copy

import pytest
import torch
from mini import FAMILIES, fixed_batch, save_mini_model

from velotune import FastLanguageModel
from velotune.models import report

TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _load_pair(
    family,
    tmp_path,
    *,
    full_finetuning=False,
    lora=True,
    attn_implementation=None,
    seed=1,
    ref_dtype=torch.float64,
    **peft_kw,
):
    """(fast, stock) with identical weights; with lora, identical non-zero adapters.

    fast runs in float32. stock (transformers + PEFT) is the reference, run in `ref_dtype`: float64 by
    default, so the comparison measures velotune's float32 error, not the sum of two float32 errors."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = save_mini_model(family, tmp_path)
    fast, _ = FastLanguageModel.from_pretrained(
        path, dtype=torch.float32, max_seq_length=128, full_finetuning=full_finetuning
    )
    if family == "gemma2" and attn_implementation is None:
        # Gemma 2's attention softcapping exists only in stock's eager attention: transformers 5.17 defaults
        # Gemma 2 to SDPA, which silently drops the softcap (velotune applies it; newer releases pick eager).
        attn_implementation = "eager"
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    if full_finetuning:
        stock.requires_grad_(True)
    if lora:
        peft_kw.setdefault("use_gradient_checkpointing", False)
        fast = FastLanguageModel.get_peft_model(fast, r=peft_kw.pop("r", 8), lora_alpha=16, **peft_kw)
        stock = get_peft_model(stock, copy.deepcopy(fast.peft_config["default"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in stock.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        missing = fast.load_state_dict(stock.state_dict(), strict=False)
        assert not missing.unexpected_keys
    return fast, stock.to(ref_dtype)


def _step(model, opt, params, batches, *, seed=None, num_items=None):
    """One AdamW step accumulated over `batches`. Returns (loss, {name: grad})."""
    if seed is not None:
        torch.manual_seed(seed)
    total = 0.0
    for b in batches:
        kw = {"num_items_in_batch": num_items} if num_items is not None else {}
        loss = model(**b, **kw).loss
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in params}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, grads


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _train_pair(
    fast,
    stock,
    steps,
    fast_batches,
    stock_batches=None,
    *,
    seed=None,
    lr=1e-3,
    fast_items=None,
    stock_items=None,
    resync=True,
):
    """AdamW steps on fast and stock. Returns {"fast": (losses, grads), "stock": ..., "stock32": ...} per step.

    resync=True: after every step the fast model's trainable weights are set to the stock model's, so
    each step's loss and gradients are compared at the same point (fp32 rounding differences of one
    step are not amplified by Adam into the next step's weights). resync=False: free-running.
    With a float64 stock reference, a float32 copy of stock ("stock32", resynchronised the same way)
    measures stock's own float32 error at each step: the yardstick where fp32 rounding alone nears 1e-5.
    """
    models = {"fast": fast, "stock": stock}
    if resync and next(stock.parameters()).dtype == torch.float64:  # (free-running compares losses only)
        models["stock32"] = copy.deepcopy(stock).float()
    params = {k: _trainable(m) for k, m in models.items()}
    names = [n for n, _ in params["stock"]]
    assert names and all([n for n, _ in p] == names for p in params.values())
    opts = {k: torch.optim.AdamW([p for _, p in ps], lr=lr) for k, ps in params.items()}
    out = {k: ([], []) for k in models}
    for _ in range(steps):
        for k, m in models.items():
            batches = fast_batches if k == "fast" else (stock_batches or fast_batches)
            items = fast_items if k == "fast" else stock_items
            loss, grads = _step(m, opts[k], params[k], batches, seed=seed, num_items=items)
            out[k][0].append(loss), out[k][1].append(grads)
        if resync:
            with torch.no_grad():
                for k in models:
                    if k != "stock":
                        for (_, a), (_, b) in zip(params[k], params["stock"]):
                            a.copy_(b)
    return out


def _train(model, batches, steps, *, seed=None, lr=1e-3, num_items=None):
    """Free-running AdamW steps of one model. Returns (losses, grads per step)."""
    params = _trainable(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=lr)
    out = [_step(model, opt, params, batches, seed=seed, num_items=num_items) for _ in range(steps)]
    return [o[0] for o in out], [o[1] for o in out]


def _assert_same_training(runs, tol=TOL):
    """Every step's loss and every trainable gradient: relative error <= tol against the stock reference.
    Where velotune's error exceeds tol, it must stay within 1.5x of stock's own float32 error there."""
    (lf, gf), (ls, gs) = runs["fast"], runs["stock"]
    g32 = runs["stock32"][1] if "stock32" in runs else None
    assert len(gf[0]) == len(gs[0]) and len(gf[0]) > 0
    for step, (a, b) in enumerate(zip(lf, ls)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: loss {a} vs stock {b}"
    for step, (ga, gb) in enumerate(zip(gf, gs)):
        for name, g in gb.items():
            assert ga[name].abs().sum() > 0 or g.abs().sum() == 0, name
            err = _rel(ga[name], g)
            if err > tol and g32 is not None:
                own = _rel(g32[step][name], g)
                assert err <= 1.5 * own, (
                    f"step {step}: grad {name} rel err {err:.2e} vs float64 stock; "
                    f"stock's own float32 error there {own:.2e}"
                )
            else:
                assert err <= tol, f"step {step}: grad {name} rel err {err:.2e}"


def _assert_same_losses(runs, tol=TOL):
    (lf, _), (ls, _) = runs["fast"], runs["stock"]
    for step, (a, b) in enumerate(zip(lf, ls)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: loss {a} vs stock {b} (free-running)"


def _held_out():
    b = fixed_batch(batch=2, seq=10, seed=7, pad_last=2)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_training_matches_stock(family, tmp_path):
    fast, stock = _load_pair(family, tmp_path)
    base = fast.get_base_model()
    assert "lora" in report(fast) and "0 on the stock PEFT path" in report(fast)
    assert base.forward.__func__.__name__ == "causal_lm_forward"
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 20, [batch]))
    with torch.no_grad():
        lf, ls = fast(**_held_out()).logits, stock(**_held_out()).logits
    assert _rel(lf, ls) <= TOL


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_full_finetuning_matches_stock(family, tmp_path):
    fast, stock = _load_pair(family, tmp_path, full_finetuning=True, lora=False)
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 4, [batch]))


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_gradient_checkpointing_matches_stock(family, tmp_path):
    fast, stock = _load_pair(family, tmp_path, use_gradient_checkpointing=True)
    assert fast.get_base_model().is_gradient_checkpointing
    fast.train()
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 4, [batch]))


def test_lora_dropout_same_seed_same_result(tmp_path):
    # float32 reference: dropout masks come from the same seed only for the same dtype
    fast, stock = _load_pair("llama", tmp_path, lora_dropout=0.1, ref_dtype=torch.float32)
    fast.train(), stock.train()
    assert "14 on the stock PEFT path" in report(fast)  # dropout: the correct (stock PEFT) path
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 3, [batch], seed=5))


def test_dora_falls_back_correctly(tmp_path):
    fast, stock = _load_pair("qwen2", tmp_path, use_dora=True)
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 2, [batch]))


def test_target_subset_rank_and_modules_to_save(tmp_path):
    fast, stock = _load_pair(
        "mistral",
        tmp_path,
        r=3,
        target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["lm_head", "embed_tokens"],
    )
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 3, [batch]))
    names = list(_train(fast, [batch], 1)[1][0])
    assert any("lm_head" in n for n in names) and any("embed_tokens" in n for n in names)


def test_gradient_accumulation_4x1_equals_1x4(tmp_path):
    fast, stock = _load_pair("llama", tmp_path)
    big = fixed_batch(batch=4, seq=12, seed=3, pad_last=4)
    n_items = int((big["labels"][:, 1:] != -100).sum())
    rows = [{k: v[i : i + 1] for k, v in big.items()} for i in range(4)]
    _assert_same_training(_train_pair(fast, stock, 3, rows, [big], fast_items=n_items))


def _packed(batch):
    """Padded rows -> one padding-free row with position_ids restarting at 0 (transformers' convention)."""
    ids, pos, labels = [], [], []
    for row_ids, row_mask, row_labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(row_mask.sum())
        ids.append(row_ids[:n]), pos.append(torch.arange(n))
        lab = row_labels[:n].clone()
        lab[0] = -100  # a packed sample's first token is never a target
        labels.append(lab)
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(pos)[None], "labels": torch.cat(labels)[None]}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_packed_equals_padded(family, tmp_path):
    fast, stock = _load_pair(family, tmp_path)
    padded = fixed_batch(batch=3, seq=10, seed=4, pad_last=3)
    padded["labels"][:, 0] = -100
    packed = _packed(padded)
    # Same tokens, same targets: the packed loss equals the padded loss only if attention stays per sample.
    _assert_same_training(_train_pair(fast, stock, 3, [packed], [padded]))


def test_rslora_matches_stock(tmp_path):
    fast, stock = _load_pair("qwen2", tmp_path, use_rslora=True)
    assert fast.get_base_model().model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(16 / 8**0.5)
    batch = fixed_batch()
    _assert_same_training(_train_pair(fast, stock, 20, [batch]))


@pytest.mark.parametrize("family,peft_kw", [(f, {}) for f in FAMILIES] + [("qwen2", {"use_rslora": True})])
def test_free_running_losses_match_stock(family, peft_kw, tmp_path):
    """20 AdamW steps without resynchronising the weights: the loss curves still agree to 1e-5.

    (Gradients are compared per step at the same weights in the tests above; free-running, Adam turns
    fp32 rounding differences into full-size updates of tiny gradient entries, and stock SDPA vs stock
    eager attention drift apart by ~1e-4 in gradient norm on rsLoRA, so gradients are not compared here.)
    """
    fast, stock = _load_pair(family, tmp_path, **peft_kw)
    _assert_same_losses(_train_pair(fast, stock, 20, [fixed_batch()], resync=False))


@pytest.mark.parametrize("hook_q,recompute", [(True, None), (False, None), (False, "layer"), (False, "mlp")])
def test_triton_path_matches_stock(hook_q, recompute, tmp_path, monkeypatch):
    """The Triton kernels themselves (interpreter) inside the model: RMSNorm, RoPE rotated in place on
    the fused q/k projection outputs, GLU, fused linear CE, the MLP's rank-r kernels (and,
    with offloaded checkpointing (recompute) the recomputed MLP makes no h: its hA comes from
    glu_lora_project). With a forward hook on a q projection (that module then runs stock), the
    output the hook holds is not rotated under it."""
    from velotune.kernels import force_triton, glu

    kw = {} if recompute is None else {"use_gradient_checkpointing": "unsloth", "recompute": recompute}
    fast, stock = _load_pair("llama", tmp_path, **kw)
    if recompute is not None:
        fast.train()
    h_given = []
    real_project = glu.glu_lora_project
    monkeypatch.setattr(
        glu, "glu_lora_project", lambda *a, h=None: h_given.append(h is not None) or real_project(*a, h=h)
    )
    batch = fixed_batch()
    held = []
    if hook_q:
        q_proj = fast.base_model.model.model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda m, args, out: held.append((out, out.detach().clone())))
    with force_triton():
        loss = fast(**batch).loss
        loss.backward()
    ref = stock(**{k: v for k, v in batch.items()}).loss
    ref.backward()
    assert _rel(loss.detach().double(), ref.detach()) <= TOL
    fast_grads = dict(_trainable(fast))
    for n, p in _trainable(stock):
        assert _rel(fast_grads[n].grad.double(), p.grad) <= TOL, n
    if hook_q:
        assert len(held) == 1 and torch.equal(held[0][0], held[0][1])
    n = fast.config.num_hidden_layers
    # per layer: lora_mlp's forward makes h first; a recompute's does not; recompute="mlp"'s Function
    # (lora/recomputed_mlp.py) takes hA from gate and up in its forward too (h then goes over gate)
    want = {None: [True] * n, "layer": [True] * n + [False] * n, "mlp": [False] * 2 * n}[recompute]
    assert h_given == want


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_triton_path_with_head_norms_matches_stock(family, tmp_path):
    """Per-head q/k RMSNorm (Qwen3; Gemma 3 with (1 + w)) on the Triton kernels (interpreter), RoPE
    rotating their fresh outputs in place: loss and every LoRA gradient against float64 stock."""
    from velotune.kernels import force_triton

    fast, stock = _load_pair(family, tmp_path)
    batch = fixed_batch()
    with force_triton():
        loss = fast(**batch).loss
        loss.backward()
    ref = stock(**batch).loss
    ref.backward()
    assert _rel(loss.detach().double(), ref.detach()) <= TOL
    fast_grads = dict(_trainable(fast))
    for n, p in _trainable(stock):
        assert _rel(fast_grads[n].grad.double(), p.grad) <= TOL, n
