"""memory/offload_adamw.py: AdamW with its moments in host memory, against torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

from velotune.memory.offload_adamw import OffloadedAdamW, _chunks

SHAPES = [(10, 7), (300,), (5, 5, 3), (1,), (64, 16)]


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def _run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        _grads(params, i)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _assert_same(ours, ours_opt, ref, ref_opt):
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours_opt.state[p][name], ref_opt.state[q][name].cpu()), name
        assert torch.equal(ours_opt.state[p]["step"].cpu(), ref_opt.state[q]["step"].cpu())


@pytest.mark.parametrize("foreach", [False, True])
def test_same_bits_as_torch_adamw_in_chunks(foreach):
    """Five steps with weight decay: parameters, both moments and the step counts equal
    torch.optim.AdamW's, with chunks small enough that the walk takes several (one parameter larger
    than a chunk). The moments are host tensors."""
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=foreach)
    ours, ref = _params(), _params()
    opt = OffloadedAdamW(ours, chunk_bytes=2000, **kw)
    ref_opt = torch.optim.AdamW(ref, **kw)
    assert [len(c) for c in _chunks(ours, 2000)] == [1, 1, 2, 1]  # 300 x 8 B > 2000: on its own
    _run(opt, ours, 5)
    _run(ref_opt, ref, 5)
    _assert_same(ours, opt, ref, ref_opt)
    assert all(opt.state[p]["exp_avg"].device.type == "cpu" for p in ours)


def test_state_dict_round_trip_and_schedulers():
    """state_dict / load_state_dict into a new optimizer, then more steps under an LR schedule: still
    torch.optim.AdamW's bits; the loaded moments are host tensors again."""
    kw = dict(lr=1e-2, weight_decay=0.01)
    ours, ref = _params(seed=1), _params(seed=1)
    opt, ref_opt = OffloadedAdamW(ours, chunk_bytes=4096, **kw), torch.optim.AdamW(ref, **kw)
    _run(opt, ours, 3)
    _run(ref_opt, ref, 3)
    again = OffloadedAdamW(ours, chunk_bytes=4096, **kw)
    again.load_state_dict(opt.state_dict())
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (again, ref_opt)]
    for i in range(3, 6):
        for o, ps, sched in ((again, ours, scheds[0]), (ref_opt, ref, scheds[1])):
            _grads(ps, i)
            o.step()
            o.zero_grad(set_to_none=True)
            sched.step()
    _assert_same(ours, again, ref, ref_opt)


def test_refusals():
    with pytest.raises(ValueError, match="chunk_bytes"):
        OffloadedAdamW(_params(), chunk_bytes=0)
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = OffloadedAdamW([p])
    p.grad = torch.randn(4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp32"):
        opt.step()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_same_bits_as_torch_adamw_with_moments_in_pinned_host_memory(fused):
    """On the GPU, with the copy streams: torch.optim.AdamW's bits (fused and foreach), the moments
    pinned host tensors, and only the staging buffers on the device."""
    kw = dict(lr=1e-2, weight_decay=0.1, fused=fused)
    ours, ref = _params("cuda", seed=2), _params("cuda", seed=2)
    opt, ref_opt = OffloadedAdamW(ours, chunk_bytes=4096, **kw), torch.optim.AdamW(ref, **kw)
    _run(opt, ours, 4)
    _run(ref_opt, ref, 4)
    opt.state_dict()  # waits for the last copies out
    _assert_same(ours, opt, ref, ref_opt)
    assert all(opt.state[p]["exp_avg"].is_pinned() for p in ours)


def _chain_loss(params, step, skip=None):
    """A loss through the parameters in order (backward reaches the last one first), the one at
    index `skip` left out (it gets no gradient that step)."""
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(3, generator=g).to(params[0].device)
    acc = x.sum()
    for i, p in enumerate(params):
        if i != skip:
            acc = acc * 0.5 + (p.sin() * (i + 1)).sum() * acc.tanh()
    return acc


def _run_backward(opt, params, steps, device="cpu"):
    for i in range(steps):
        _chain_loss(params, i, skip=2 if i == 3 else None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _update_in_backward(device, steps=5, **kw):
    ours, ref = _params(device, seed=3), _params(device, seed=3)
    opt = OffloadedAdamW(ours, chunk_bytes=2000, update_in_backward=True, **kw)
    ref_opt = torch.optim.AdamW(ref, **kw)
    _run_backward(opt, ours, steps)
    _run_backward(ref_opt, ref, steps)
    return ours, opt, ref, ref_opt


@pytest.mark.parametrize("foreach", [False, True])
def test_update_in_backward_same_bits_as_torch_adamw(foreach):
    """update_in_backward=True over five steps of a loss through all parameters (one step leaves a
    parameter out: its chunk is finished by step()): torch.optim.AdamW's bits after each step; the
    hooks updated the parameters during backward and dropped their gradients."""
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=foreach)
    ours, opt, ref, ref_opt = _update_in_backward("cpu", **kw)
    _assert_same(ours, opt, ref, ref_opt)
    before = [p.detach().clone() for p in ours]
    _chain_loss(ours, 9).backward()
    assert all(p.grad is None for p in ours)  # updated in backward, gradients dropped
    assert not any(torch.equal(p, b) for p, b in zip(ours, before))
    opt.step()


def test_update_in_backward_refuses_gradient_accumulation():
    ours = _params(seed=4)
    _opt = OffloadedAdamW(ours, chunk_bytes=2000, update_in_backward=True)  # alive: its hooks update in backward
    _chain_loss(ours, 0).backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        _chain_loss(ours, 1).backward()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False])
def test_gpu_update_in_backward_same_bits_as_torch_adamw(fused):
    """On the GPU with the copy streams and the moments fetched ahead in backward order: the same
    bits as torch.optim.AdamW after backward."""
    ours, opt, ref, ref_opt = _update_in_backward("cuda", lr=1e-2, weight_decay=0.1, fused=fused)
    opt.state_dict()
    _assert_same(ours, opt, ref, ref_opt)


def test_update_in_backward_hooks_do_not_keep_the_optimizer_alive():
    import gc
    import weakref

    ours = _params(seed=5)
    opt = OffloadedAdamW(ours, chunk_bytes=2000, update_in_backward=True)
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
    _chain_loss(ours, 0).backward()  # the orphaned hooks do nothing
    assert all(p.grad is not None for p in ours)
