"""The generic fast path: any other decoder-only causal LM (no family file), piece by piece.

Each piece is bound per instance (models/patch.py `bind_forward`, so `unpatch` reverts it) only after a
numerical probe at load time has shown it computes what the stock module computes; otherwise that
piece stays stock and the report says why. No source is read or rewritten: a probe compares outputs.

    lm_head   the fused linear cross-entropy (models/loss.py) replaces logits + loss. Probe: one stock
              forward with labels on PROBE_SHAPE tokens, a hook capturing the head's input h and output z:
              (1) the returned logits are z, or z times one number c (Cohere's logit_scale, Granite's
                  1/logits_scaling), found by least squares and checked to the dtype's rounding;
              (2) the returned loss is the shifted cross-entropy of those logits (fp32, 1e-5): no
                  auxiliary loss (an MoE router loss, say) is added;
              (3) fused_linear_cross_entropy(h, W, labels, logit_scale=c) equals F.cross_entropy(
                  (h @ W^T + b) * c, labels) in fp32 on the model's device: loss, dh and dW (1e-5;
                  the first PROBE_VOCAB rows of W);
              (4) the patched forward's loss on the probe equals stock's (1e-5 in fp32; in 16-bit
                  dtypes 1e-2, the chunked GEMM rounds differently: (3) checked the numerics).
    norm      velotune's RMSNorm kernel (models/norm.py) on modules that look like an RMSNorm (a class
              named *Norm* with one 1-D `weight`, no bias, an eps attribute). Probe per class, an fp32
              copy with random weights on the model's device, x [2, 3, H]: output, dx and dweight equal
              (1e-5) to rms_norm in one of NORM_STYLES (Llama w * n, Gemma (1 + w) * n, OLMo 2 w * n
              rounded once); in a 16-bit model, a copy of the module (random weights, its dtype) must
              also equal that convention's torch reference bit for bit (they differ in where they round).
    lora      a PEFT LoRA layer over a plain nn.Linear runs as one fused function (models/lora_linear.py).
              Probe per (class, in, out, bias): an fp32 copy with random adapters: y, dx, dA, dB (1e-5).
              Other bases (4-bit, Conv1D, embeddings) stay on PEFT's path.
    layers    offloaded checkpointing (memory/checkpointing.py) needs only transformers'
              GradientCheckpointingLayer, which every decoder layer of a recent model is: it is
              exact by construction (torch's non-reentrant checkpoint; a bit copy comes back).
Attention and MLP stay stock (their wiring differs per model). Mixture-of-experts blocks stay stock
and the report names them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from velotune.models.binding import is_patched
from velotune.models.loss import resolve_lm_head
from velotune.models.patch import bind_forward, release_forward
from velotune.models.spec import FamilySpec

log = logging.getLogger("velotune")

PROBE_SHAPE = (2, 8)  # tokens of the head probe
PROBE_VOCAB = 4096  # rows of the lm_head weight the fp32 kernel check uses
TOL = 1e-5  # fp32 bar, as for the family paths
TOL_16BIT = 1e-2  # patched-vs-stock loss in a bf16/fp16 model (plumbing check; numerics in fp32)
EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


@dataclass(frozen=True)
class GenericSpec(FamilySpec):
    """A FamilySpec made at load time from probes: the one the generic path's fused forwards read."""

    logit_scale: float | None = None  # logits = lm_head(h) * logit_scale (None: 1)

    def logits_multiplier(self, config) -> float | None:
        return self.logit_scale

    def describe(self) -> str:
        return f"generic: {self.model_types[0]}"


@dataclass
class Piece:
    """One probed piece: kind ("lm_head", "norm", "lora"), what it is, whether it runs fast, why."""

    kind: str
    name: str
    fast: bool
    note: str
    count: int = 0


@dataclass
class GenericPlan:
    model_type: str
    arch: str
    pieces: list[Piece] = field(default_factory=list)
    moe_blocks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        fast = [f"{p.kind} {p.name} ({p.note})" if p.note else f"{p.kind} {p.name}" for p in self.pieces if p.fast]
        stock = [f"{p.kind} {p.name} ({p.note})" for p in self.pieces if not p.fast]
        parts = [f"fast: {'; '.join(fast) or 'nothing'}"]
        if stock:
            parts.append(f"stock: {'; '.join(stock)}")
        if self.moe_blocks:
            parts.append(f"MoE: {len(self.moe_blocks)} expert block(s) stock ({self.moe_blocks[0]})")
        return " | ".join(parts)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _randn(*shape, g, device) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device)


def generic_plan(model: nn.Module) -> GenericPlan | None:
    """The plan `prepare_generic` stored on `model` (or on the model a PeftModel wraps), else None."""
    for m in model.modules():
        plan = m.__dict__.get("_velotune_generic")
        if plan is not None:
            return plan
    return None


def is_decoder_only(model: nn.Module) -> bool:
    config = model.config
    return (
        not getattr(config, "is_encoder_decoder", False)
        and model.get_output_embeddings() is not None
        and hasattr(model, getattr(model, "base_model_prefix", "") or "\0")
    )


# ---------------------------------------------------------------------------------------- lm_head
def _shifted(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)


def probe_head(model: nn.Module, spec_kw: dict) -> tuple[Piece, GenericSpec | None]:
    """Run the lm_head probe (module docstring) and bind the fused loss when it passes."""
    head = resolve_lm_head(model.get_output_embeddings())
    if head is None:
        return Piece("lm_head", type(model.get_output_embeddings()).__name__, False, "not a plain nn.Linear"), None
    vocab, device, dtype = head.out_features, head.weight.device, head.weight.dtype
    ids = ((torch.arange(PROBE_SHAPE[0] * PROBE_SHAPE[1]) * 7919 + 11) % vocab).view(PROBE_SHAPE).to(device)
    seen = {}
    hook = head.register_forward_hook(lambda m, a, o: seen.update(h=a[0].detach(), z=o.detach()))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, labels=ids, use_cache=False)
    except Exception as e:  # noqa: BLE001 -- any failure of the stock forward means: leave it stock
        return Piece("lm_head", "cross-entropy", False, f"stock probe forward failed: {type(e).__name__}"), None
    finally:
        hook.remove()
    if "z" not in seen or out.logits is None or out.logits.shape != seen["z"].shape or out.loss is None:
        return Piece("lm_head", "cross-entropy", False, "logits are not the lm_head's output"), None
    z, logits = seen["z"].double(), out.logits.double()
    scale = None
    if not torch.equal(z, logits):
        c = ((z * logits).sum() / (z * z).sum()).item()
        if _rel(z * c, logits) > torch.finfo(out.logits.dtype).eps:
            return Piece(
                "lm_head",
                "cross-entropy",
                False,
                f"logits are not lm_head(h) times one number (rel err {_rel(z * c, logits):.1e})",
            ), None
        scale = c
    shift = _shifted(ids)
    want = F.cross_entropy(out.logits.float().reshape(-1, vocab), shift, ignore_index=-100)
    if _rel(out.loss.detach().float(), want) > TOL:
        return Piece(
            "lm_head",
            "cross-entropy",
            False,
            "the loss is not the shifted cross-entropy of the logits (an auxiliary loss?)",
        ), None
    err = _check_fused_ce(seen["h"], head, shift, scale)
    if err > TOL:
        return Piece("lm_head", "cross-entropy", False, f"fused CE differs in fp32 (rel err {err:.1e})"), None
    spec = GenericSpec(causal_lm=type(model).__name__, logit_scale=scale, **spec_kw)
    bind_forward(model, "causal_lm", spec)
    try:
        with torch.no_grad():
            got = model(input_ids=ids, labels=ids, use_cache=False).loss
        err = _rel(got.float(), out.loss.float())
    except Exception as e:  # noqa: BLE001
        err, why = float("inf"), type(e).__name__
    else:
        why = f"rel err {err:.1e}"
    if err > (TOL if dtype in (torch.float32, torch.float64) else TOL_16BIT):
        release_forward(model)
        return Piece("lm_head", "cross-entropy", False, f"patched forward differs from stock ({why})"), None
    note = "" if scale is None else f"logits x {scale:.6g} folded in"
    return Piece("lm_head", "fused linear cross-entropy", True, note, 1), spec


def _check_fused_ce(h: torch.Tensor, head: nn.Linear, labels: torch.Tensor, scale: float | None) -> float:
    """Largest rel error of loss, dh, dW: fused_linear_cross_entropy vs F.cross_entropy, fp32."""
    from velotune.kernels.fused_linear_ce import fused_linear_cross_entropy

    rows = min(head.out_features, PROBE_VOCAB)
    h32 = h.reshape(-1, h.shape[-1]).float()
    W = head.weight.detach()[:rows].float()
    b = None if head.bias is None else head.bias.detach()[:rows].float()
    labels = torch.where(labels >= 0, labels % rows, labels).to(h.device)
    errs = []
    grads = []
    for fused in (False, True):
        x, w = h32.clone().requires_grad_(), W.clone().requires_grad_()
        if fused:
            loss = fused_linear_cross_entropy(x, w, labels, bias=b, logit_scale=scale)
        else:
            z = F.linear(x, w, b)
            loss = F.cross_entropy(z if scale is None else z * scale, labels, ignore_index=-100)
        loss.backward()
        grads.append((loss.detach(), x.grad, w.grad))
    for a, s in zip(grads[1], grads[0]):
        errs.append(_rel(a, s))
    return max(errs)


# ---------------------------------------------------------------------------------------- norms
def _eps_attr(m: nn.Module) -> str | None:
    for name in EPS_ATTRS:
        if isinstance(m.__dict__.get(name), (int, float)):
            return name
    return None


def _rms_shaped(m: nn.Module) -> str | None:
    """None when `m` looks like an RMSNorm the kernel could replace; else why not."""
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__ in ("LayerNorm", "GroupNorm"):
        return "a LayerNorm (mean-centred, with bias)"
    params = dict(m.named_parameters(recurse=False))
    w = params.get("weight")
    if list(params) != ["weight"] or w is None or w.dim() != 1 or m._modules:
        return "not a weight-only norm"
    if _eps_attr(m) is None:
        return "no eps attribute"
    return None


def norm_modules(model: nn.Module) -> dict[type, list[nn.Module]]:
    """Modules whose class name says Norm, grouped by class (first seen first)."""
    out: dict[type, list[nn.Module]] = {}
    for m in model.modules():
        if "norm" in type(m).__name__.lower() and (m._parameters or not m._modules):
            out.setdefault(type(m), []).append(m)
    return out


# (offset, weight_in_fp32) of the conventions the kernel implements: Llama w * n.to(dtype); Gemma
# ((1 + w) * n).to(dtype); OLMo 2 (w * n).to(dtype). The first two differ in math, the last two only
# in where 16-bit rounding happens.
NORM_STYLES = ((0.0, False), (1.0, False), (0.0, True))


def probe_norm(module: nn.Module) -> tuple[tuple[float, bool] | None, str]:
    """((offset, weight_in_fp32), note) when velotune's rms_norm computes what `module` does (module
    docstring), else (None, why not)."""
    from velotune.kernels.rmsnorm import rms_norm, rms_norm_reference

    why = _rms_shaped(module)
    if why is not None:
        return None, why
    eps_attr = _eps_attr(module)
    eps = float(getattr(module, eps_attr))
    device, dtype = module.weight.device, module.weight.dtype
    H = module.weight.shape[0]
    g = _gen()
    x, w, dy = _randn(2, 3, H, g=g, device=device), _randn(H, g=g, device=device), _randn(2, 3, H, g=g, device=device)
    try:
        ref = copy.deepcopy(module).float()
        with torch.no_grad():
            ref.weight.copy_(w)
        ref.weight.requires_grad_(True)
        xs = x.clone().requires_grad_()
        ys = ref(xs)
        (ys * dy).sum().backward()
        m16 = None
        if dtype in (torch.float16, torch.bfloat16):  # random weights too: ones would hide the rounding
            m16 = copy.deepcopy(module)
            with torch.no_grad():
                m16.weight.copy_(w.to(dtype))
    except Exception as e:  # noqa: BLE001
        return None, f"stock fp32 probe failed: {type(e).__name__}"
    if not isinstance(ys, torch.Tensor) or ys.shape != x.shape:
        return None, "output is not one tensor of the input's shape"
    best, math_ok = float("inf"), False
    for offset, in_fp32 in NORM_STYLES:
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        yf = rms_norm(xf, wf, eps, offset=offset, weight_in_fp32=in_fp32)
        (yf * dy).sum().backward()
        err = max(_rel(yf, ys), _rel(xf.grad, xs.grad), _rel(wf.grad, ref.weight.grad))
        best = min(best, err)
        if err > TOL:
            continue
        math_ok = True
        if m16 is not None:
            x16 = x.to(dtype)
            with torch.no_grad():
                want = rms_norm_reference(x16, m16.weight, eps, offset=offset, weight_in_fp32=in_fp32)
                if not torch.equal(m16(x16), want):
                    continue
        style = "fp32 weight" if in_fp32 else f"offset {offset:g}"
        return (offset, in_fp32), f"{style}, {eps_attr}"
    if math_ok:
        return None, f"RMSNorm math, but it rounds like none of the kernel's conventions in {dtype}"
    return None, f"not an RMSNorm (rel err {best:.1e})"


# ---------------------------------------------------------------------------------------- LoRA
def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from velotune.lora.layers import is_lora_layer

    return [m for m in model.modules() if is_lora_layer(m)]


def _signature(m: nn.Module) -> tuple:
    base = m.base_layer
    return (
        type(m).__name__,
        type(base).__name__,
        getattr(base, "in_features", None),
        getattr(base, "out_features", None),
        getattr(base, "bias", None) is not None,
    )


def probe_lora(module: nn.Module) -> str | None:
    """None when the fused single-projection LoRA function computes what `module` (a PEFT LoRA layer)
    does in fp32 (y, dx, dA, dB, 1e-5; random adapters on a copy), else why not."""
    from velotune.lora import lora_projections, resolve

    if type(module.base_layer) is not nn.Linear:
        return f"base is {type(module.base_layer).__name__}, not nn.Linear"
    try:
        c = copy.deepcopy(module).float().eval()
    except Exception as e:  # noqa: BLE001
        return f"could not copy the layer: {type(e).__name__}"
    proj = resolve(c)
    if proj is None or proj.A is None:
        return "not fusable (DoRA, a variant, several adapters, lora_bias or no active adapter)"
    device = proj.A.device
    g = _gen()
    with torch.no_grad():
        proj.A.copy_(_randn(*proj.A.shape, g=g, device=device) * 0.1)
        proj.B.copy_(_randn(*proj.B.shape, g=g, device=device) * 0.1)
    x = _randn(2, 3, proj.A.shape[1], g=g, device=device)
    dy = _randn(2, 3, proj.B.shape[0], g=g, device=device)
    results = []
    for fused in (False, True):
        proj.A.grad = proj.B.grad = None
        xi = x.clone().requires_grad_()
        y = (
            lora_projections(xi.reshape(-1, x.shape[-1]), [proj])[0].view(*x.shape[:-1], -1)
            if fused
            else type(c).forward(c, xi)
        )
        (y * dy).sum().backward()
        results.append((y.detach(), xi.grad, proj.A.grad.clone(), proj.B.grad.clone()))
    err = max(_rel(a, b) for a, b in zip(results[1], results[0]))
    return None if err <= TOL else f"fused LoRA differs in fp32 (rel err {err:.1e})"


# ---------------------------------------------------------------------------------------- entry points
def _moe_blocks(model: nn.Module) -> list[str]:
    names, inside = [], set()
    for name, m in model.named_modules():
        cls = type(m).__name__.lower()
        if ("moe" in cls or "experts" in cls) and not any(name.startswith(p + ".") for p in inside):
            inside.add(name)
            names.append(type(m).__name__)
    return names


def prepare_generic(model: nn.Module) -> bool:
    """Probe and bind the generic pieces on a freshly loaded model (no family file). Returns True when
    the generic path applies (a decoder-only causal LM); the one-line log says which pieces are fast."""
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    model_type = getattr(model.config, "model_type", None) or "?"
    if not is_decoder_only(model):
        log.warning(
            "velotune: %s (model_type=%r) is not supported by the fused path; using stock transformers",
            arch,
            model_type,
        )
        return False
    plan = GenericPlan(model_type=model_type, arch=arch, moe_blocks=_moe_blocks(model))
    was_training = model.training
    model.eval()
    try:
        spec_kw = dict(name="generic", model_types=(model_type,), attention="", mlp="", norm="")
        piece, _ = probe_head(model, spec_kw)
        plan.pieces.append(piece)
        for cls, modules in norm_modules(model).items():
            style, note = probe_norm(modules[0])
            if style is None:
                plan.pieces.append(Piece("norm", cls.__name__, False, note, len(modules)))
                continue
            nspec = GenericSpec(
                causal_lm="",
                norm_offset=style[0],
                norm_weight_in_fp32=style[1],
                norm_eps_attr=_eps_attr(modules[0]),
                **{**spec_kw, "norm": cls.__name__},
            )
            for m in modules:
                bind_forward(m, "norm", nspec)
            plan.pieces.append(Piece("norm", cls.__name__, True, f"x{len(modules)}, {note}", len(modules)))
    finally:
        model.train(was_training)
    model.__dict__["_velotune_generic"] = plan
    log.warning(
        "velotune: %s (model_type=%r) has no family file: generic path, each piece probed against stock -- %s",
        arch,
        model_type,
        plan.summary(),
    )
    return True


def prepare_generic_peft(peft_model) -> bool:
    """Probe and bind fused LoRA on the LoRA layers of a PeftModel whose base took the generic path."""
    plan = generic_plan(peft_model)
    if plan is None:
        return False
    plan.pieces = [p for p in plan.pieces if p.kind != "lora"]
    spec = GenericSpec(name="generic", model_types=(plan.model_type,), causal_lm="", attention="", mlp="", norm="")
    groups: dict[tuple, list[nn.Module]] = {}
    for m in _lora_layers(peft_model):
        groups.setdefault(_signature(m), []).append(m)
    for sig, modules in groups.items():
        why = probe_lora(modules[0])
        name = f"{sig[0]}[{sig[2]}->{sig[3]}{', bias' if sig[4] else ''}]"
        if why is None:
            for m in modules:
                if not is_patched(m):
                    bind_forward(m, "lora", spec)
        plan.pieces.append(Piece("lora", name, why is None, why or f"x{len(modules)}", len(modules)))
    lora = [p for p in plan.pieces if p.kind == "lora"]
    if lora:
        stock = "".join(f"; {p.name} stock: {p.note}" for p in lora if not p.fast)
        log.warning(
            "velotune: LoRA on the generic path: %d of %d layer(s) fused%s",
            sum(p.count for p in lora if p.fast),
            sum(p.count for p in lora),
            stock,
        )
    return True


def _checkpointing(model: nn.Module) -> str:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return "not available (no GradientCheckpointingLayer)"
    on = [m for m in layers if m.__dict__.get("gradient_checkpointing")]
    fn = [m.__dict__.get("_gradient_checkpointing_func") for m in on]
    if on and all(getattr(f, "velotune_offloaded", False) for f in fn):  # memory/checkpointing.py marks it
        return f"offloaded, {len(on)} decoder layer(s)"
    if on:
        return f"transformers' checkpointing, {len(on)} decoder layer(s)"
    return f"off ({len(layers)} decoder layer(s) could be checkpointed)"


def report_lines(model: nn.Module) -> list[str]:
    """`velotune.report(model)` for a model on the generic path."""
    from velotune.lora import resolve

    plan = generic_plan(model)
    lines = [
        f"velotune generic path ({plan.arch}, model_type={plan.model_type!r}: no family file; "
        "each piece probed against stock at load)"
    ]
    for p in plan.pieces:
        if p.kind == "lora":
            continue
        state = "fast " if p.fast else "stock"
        lines.append(f"  {p.kind:<10} {state} {p.name}" + (f" ({p.note})" if p.note else ""))
    lora = [p for p in plan.pieces if p.kind == "lora"]
    if lora:
        layers = _lora_layers(model)
        fused = sum(1 for m in layers if is_patched(m) and resolve(m) is not None)
        lines.append(
            f"  lora       {fused} layer(s) fused, {len(layers) - fused} on the stock PEFT path"
            + "".join(f"; {p.name}: {p.note}" for p in lora if not p.fast)
        )
    lines.append(f"  layers     checkpointing: {_checkpointing(model)}")
    lines.append(
        "  attention  stock;  mlp  stock"
        + (f";  experts  stock ({len(plan.moe_blocks)} MoE block(s), {plan.moe_blocks[0]})" if plan.moe_blocks else "")
    )
    return lines
