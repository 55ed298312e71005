"""Padding-free batches inside the model: only real tokens reach a GEMM.

A padded batch `input_ids [B, T]` + `attention_mask [B, T]` (right, left or any padding) is gathered
into one row of its N real tokens, `[1, N]`, run through the decoder stack with each sample's
attention kept inside the sample (sequence boundaries: `Varlen`, read by models/attention.py), and
the result is scattered back to `[B, T, ...]`, so callers see stock's layout:

    packed = pack(like, attention_mask, position_ids)   # None: nothing to gain (no padding, a cache, ...)
    packed.gather(input_ids)      -> [1, N]             packed.scatter(hidden [1, N, H]) -> [B, T, H]

Exactly stock's results at every real position:
* position ids are the ones stock would use, gathered: the given ones, else 0..T-1 per row (so a
  left-padded row keeps its offset positions, as stock does; RoPE sees the same numbers);
* token t of a sample attends to the sample's tokens 0..t (its real tokens: stock's padding mask),
  within the layer's sliding window where stock's mask has one, with the same scale and softcap;
* the rows at padding positions of the scattered output are zeros (stock computes values there
  that depend on the padding and that any loss masks out; models/loss.py checks that the labels do).
A batch TRL already made padding-free (`[1, N]`, no mask, position ids restarting per sample) is
split into its samples the way transformers' `find_packed_sequence_indices` does (a new sample
where the position does not grow by one), and keeps its layout.

Cost: the real-token layout is read back to the host once per forward (one small device->host
copy); the gather and scatter are index copies of the embeddings and the last hidden state.

The decoder stack (`<Family>Model`) gets the packed row with a zero-size 4-D mask (transformers
returns a prepared 4-D mask unchanged, so it builds no [N, N] mask) and the boundaries as the
keyword `VARLEN_KW`, which its decoder layers hand to each attention module. Any attention that
would not run velotune's path fails loudly on that mask instead of attending across samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from velotune.models.binding import is_patched, role_of

VARLEN_KW = "velotune_varlen"
ALLOW_KW = "velotune_padding_free"  # False from the CausalLM forward: this call runs padded (models/loss.py)
# TRL's padding-free collator adds these for flash-attention models; the packed path finds the same
# boundaries from the position ids, so they are dropped there.
_TRL_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass(eq=False)
class Varlen:
    """Sample boundaries of a packed row [1, N]: sample s is tokens starts[s] .. starts[s] + lengths[s] - 1.

    lengths/starts: host ints; cu: int32 [S + 1] cumulative offsets on the device (varlen kernels);
    max_len: the longest sample."""

    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    cu: torch.Tensor
    max_len: int


@dataclass(eq=False)
class Packed:
    """Where the real tokens of a [B, T] batch sit (flat indices into B * T), and their boundaries."""

    batch: int
    seq: int
    index: torch.Tensor  # int64 [N] on the device, ascending
    position_ids: torch.Tensor  # [1, N] on the device
    varlen: Varlen
    keeps_layout: bool  # already one row without padding (TRL padding-free): nothing to scatter

    @property
    def tokens(self) -> int:
        return int(self.index.numel())

    def gather(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """[B, T, ...] -> [1, N, ...] (real tokens, in order)."""
        if x is None or self.keeps_layout:
            return x
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat.index_select(0, self.index.to(x.device)).unsqueeze(0)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at padding positions (differentiable)."""
        if self.keeps_layout:
            return y
        flat = y.new_zeros(self.batch * self.seq, *y.shape[2:])
        return flat.index_copy(0, self.index.to(y.device), y[0]).view(self.batch, self.seq, *y.shape[2:])

    def marker(self, device) -> torch.Tensor:
        """The zero-size 4-D attention mask handed to the stack (see the module docstring)."""
        return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def _varlen(lengths: list[int], device) -> Varlen:
    starts, a = [], 0
    for n in lengths:
        starts.append(a)
        a += n
    cu = torch.tensor([0, *[s + n for s, n in zip(starts, lengths)]], dtype=torch.int32)
    cu = cu.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else cu.to(device)
    return Varlen(tuple(lengths), tuple(starts), cu, max(lengths))


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pack(like: torch.Tensor, attention_mask, position_ids) -> Packed | None:
    """The packed layout of a batch `like` [B, T, ...] (input ids or embeddings), or None where
    packing changes nothing (no padding and no packed samples) or the mask is not a [B, T] one."""
    B, T = like.shape[:2]
    device = like.device
    if attention_mask is not None:
        if not torch.is_tensor(attention_mask) or attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, T):
            return None
        mask = attention_mask.detach().to("cpu", torch.bool)  # the one device->host read
        if bool(mask.all()):
            return None
        counts = mask.sum(1).tolist()
        index = mask.reshape(-1).nonzero().squeeze(1)
        if position_ids is None:
            pos = (index % T).unsqueeze(0)
            pos_d = _to_device(pos, device)
        else:
            pos_d = position_ids.to(device).expand(B, T).reshape(-1).index_select(0, _to_device(index, device))[None]
        lengths = [n for n in counts if n > 0]
        if not lengths:
            return None
        return Packed(B, T, _to_device(index, device), pos_d, _varlen(lengths, device), keeps_layout=False)
    if position_ids is None or not torch.is_tensor(position_ids) or position_ids.dim() != 2:
        return None
    pos = position_ids.detach().to("cpu").expand(B, T)  # the one device->host read
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1  # transformers' packed-sequence rule
    if int(starts.sum()) == B:
        return None  # one sample per row: dense path
    bounds = starts.reshape(-1).nonzero().squeeze(1).tolist() + [B * T]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    index = torch.arange(B * T)
    return Packed(
        B,
        T,
        _to_device(index, device),
        position_ids.to(device).expand(B, T).reshape(1, -1),
        _varlen(lengths, device),
        keeps_layout=B == 1,
    )


def wants_cache(module, kwargs: dict) -> bool:
    """Whether a forward of decoder stack / CausalLM `module` with these kwargs would build or use a KV cache."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return True
    use_cache = kwargs.get("use_cache")
    if use_cache is None:  # transformers takes the config's value; a cache in training is never read
        return bool(getattr(module.config, "use_cache", False)) and not module.training
    return bool(use_cache)


def attention_takes_varlen(stack) -> bool:
    """Every attention module of the decoder stack runs velotune's path for this forward (patched,
    an SDPA/eager implementation, no attention dropout in training), and no dropout is active: a
    dropout mask drawn over [1, N] instead of [B, T] would take other random numbers than the padded
    batch's under the same seed (LoRA dropout: same distribution, not the same bits), so training with
    dropout runs padded."""
    impl = getattr(stack.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", None):
        return False
    n = 0
    for m in stack.modules():
        if m.training and isinstance(m, torch.nn.Dropout) and m.p > 0:
            return False
        if role_of(m) == "attention" or type(m).__name__.endswith("Attention"):
            if not is_patched(m) or (m.training and getattr(m, "attention_dropout", 0.0) > 0):
                return False
            n += 1
    return n > 0


def applies(stack, kwargs: dict) -> bool:
    """Padding-free may run for this forward of the decoder stack `stack` (a `<Family>Model`)."""
    if not stack.__dict__.get("_velotune_padding_free", True) or wants_cache(stack, kwargs):
        return False
    for flag in ("output_hidden_states", "output_attentions"):  # per-layer outputs keep stock's layout
        if kwargs.get(flag) or (kwargs.get(flag) is None and getattr(stack.config, flag, False)):
            return False
    return attention_takes_varlen(stack)


def drop_trl_varlen_keys(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _TRL_VARLEN_KEYS}


def record(stack, packed: Packed) -> None:
    """Counters on the stack instance (benchmarks and tests read them: `padding_free_stats(model)`)."""
    stats = stack.__dict__.setdefault(
        "velotune_padding_free_stats", {"forwards": 0, "real_tokens": 0, "batch_tokens": 0}
    )
    stats["forwards"] += 1
    stats["real_tokens"] += packed.tokens
    stats["batch_tokens"] += packed.batch * packed.seq


def padding_free_stats(model) -> dict:
    """{"forwards", "real_tokens", "batch_tokens"} summed over the decoder stacks of `model` (empty if none ran)."""
    out: dict = {}
    for m in model.modules():
        for k, v in m.__dict__.get("velotune_padding_free_stats", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def set_padding_free(model, on: bool) -> int:
    """Switch padding-free on or off for every velotune decoder stack in `model`; returns how many."""
    if not isinstance(on, bool):
        raise ValueError(f"padding_free={on!r}: use True or False")
    n = 0
    for m in model.modules():
        if role_of(m) == "body":
            m._velotune_padding_free = on
            n += 1
    return n


def stack_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
    """Replacement for `<Family>Model.forward` (the decoder stack): a padded batch runs padding-free
    (see the module docstring) and comes back in its own layout; anything else runs stock."""
    like = input_ids if input_ids is not None else inputs_embeds
    packed = None
    allowed = kwargs.pop(ALLOW_KW, True)
    if allowed and kwargs.get(VARLEN_KW) is None and like is not None and like.dim() >= 2 and applies(self, kwargs):
        packed = pack(like, attention_mask, position_ids)
    if packed is None:
        return self._velotune_stock_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
    record(self, packed)
    kwargs = drop_trl_varlen_keys(kwargs)
    kwargs[VARLEN_KW] = packed.varlen
    kwargs["use_cache"] = False  # (None in training: transformers would build a cache nobody reads)
    out = self._velotune_stock_forward(
        input_ids=packed.gather(input_ids),
        attention_mask=packed.marker(like.device),
        position_ids=packed.position_ids,
        inputs_embeds=packed.gather(inputs_embeds),
        **kwargs,
    )
    out.last_hidden_state = packed.scatter(out.last_hidden_state)
    return out
