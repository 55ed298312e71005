"""Every Triton kernel compiles for the GPU target (sm_90) on this GPU-less machine.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (on 2026-11-30 a
helper with two `return`s under a constexpr `if` passed every CPU test and failed to compile on the
H200: the compiler types both branches). Compiling here, front end to cubin, catches that class
of error before any device time is spent. Signatures follow each kernel's launch site."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The compile runs in a child process: this test process has TRITON_INTERPRET=1 (tests/conftest.py),
# under which @triton.jit gives interpreter objects that cannot be compiled.
CHILD = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from velotune.kernels import cross_entropy, glu, halves_accumulator, rmsnorm, rope
from velotune.kernels import embedding_gather, fused_linear_logprob
from velotune.quant import dequant_kernel

H100 = GPUTarget("cuda", 90, 32)
CE_ROWS = ["*bf16", "i32", "*bf16", "i32", "*i64", "*fp32", "*fp32", "*fp32", "i32", "i32", "fp32", "fp32"]
NF4 = ["*u8", "*u8", "*fp32", "*fp32", "*fp32"]   # packed, absmax (nested codes), code2, absmax2, offset
CASES = [
    (rmsnorm._rms_fwd_kernel, ["*bf16", "i32", "*bf16", "i32", "*bf16", "*fp32", "i32", "fp32", "fp32"],
     dict(GEMMA=False, BLOCK=4096, SINGLE=True), 8),
    (rmsnorm._rms_bwd_kernel, ["*bf16", "i32", "*bf16", "i32", "*bf16", "i32", "*bf16", "*fp32", "*fp32", "i32",
                               "i32", "i32", "fp32"], dict(GEMMA=True, HAS_DW=True, BLOCK=4096, SINGLE=True), 8),
    (rope._rope_kernel, ["*bf16", "*bf16", "i32", "i32", "i32", "*bf16", "*bf16", "i32", "i32", "i32",
                         "*bf16", "*bf16", "i32", "i32", "i32"],
     dict(HQ=32, HK=8, HALF=64, BACKWARD=False, BLOCK_HQ=16, BLOCK_HK=8, BLOCK_D=64), 4),
    (glu._glu_fwd_kernel, ["*bf16", "*bf16", "*bf16", "i32"], dict(ACT=2, BLOCK=1024), 4),
    (glu._glu_bwd_kernel, ["*bf16", "*bf16", "*bf16", "*bf16", "*bf16", "i32"], dict(ACT=1, BLOCK=1024), 4),
    (glu._glu_lora_a_grad_kernel, ["*bf16", "*bf16", "*bf16", "*fp32"] + ["i32"] * 7,
     dict(ACT=0, IEEE=False, BLOCK_N=64, BLOCK_I=64, BLOCK_R=16), 4),
    (glu._glu_lora_a_grad_kernel, ["*fp32", "*fp32", "*fp32", "*fp32"] + ["i32"] * 7,
     dict(ACT=2, IEEE=True, BLOCK_N=64, BLOCK_I=64, BLOCK_R=32), 4),
    (glu._glu_lora_project_kernel, ["*bf16"] * 4 + ["i32"] * 7,
     dict(ACT=0, IEEE=False, BLOCK_N=32, BLOCK_I=128, BLOCK_R=16), 4),
    (glu._glu_lora_project_kernel, ["*fp32"] * 4 + ["i32"] * 7,
     dict(ACT=2, IEEE=True, BLOCK_N=32, BLOCK_I=128, BLOCK_R=32), 4),
    (glu._glu_bwd_lora_kernel, ["*bf16"] * 7 + ["i32"] * 8,
     dict(ACT=0, IEEE=False, BLOCK_N=64, BLOCK_I=64, BLOCK_R=16), 4),
    (glu._glu_bwd_lora_kernel, ["*fp32"] * 7 + ["i32"] * 8,
     dict(ACT=1, IEEE=True, BLOCK_N=64, BLOCK_I=64, BLOCK_R=16), 4),
    (cross_entropy._ce_rows_kernel, CE_ROWS, dict(HAS_SCALE=True, HAS_CAP=True, FORWARD=True, BACKWARD=False,
                                                  BLOCK=4096), 8),
    (cross_entropy._ce_rows_kernel, CE_ROWS, dict(HAS_SCALE=False, HAS_CAP=True, FORWARD=False, BACKWARD=True,
                                                  BLOCK=4096), 8),
    (fused_linear_logprob._logprob_rows_kernel, ["*bf16", "i32", "*i64", "*fp32", "*fp32", "*fp32", "i32", "fp32",
                                                 "fp32", "fp32"],
     dict(HAS_SCALE=False, HAS_CAP=True, WANT_ENT=True, WANT_GRAD=True, BLOCK=4096), 8),
    (dequant_kernel._nf4_dequant_rows_kernel, NF4 + ["*i64", "*bf16", "i64"],
     dict(BLOCKSIZE=64, BLOCKSIZE2=256, NESTED=True, ROWS=32, OUT_BF16=True), 4),
    (embedding_gather._gather_rows_kernel, ["*bf16", "*i64", "*bf16", "i32", "i32", "i32"],
     dict(BLOCK=embedding_gather.BLOCK), 4),
    (halves_accumulator._scale_cast_kernel, ["*fp32", "*i16", "*fp32", "i64"], dict(BLOCK=4096, OUT_BF16=True), 8),
    (halves_accumulator._scale_cast_kernel, ["*fp32", "*fp16", "*fp32", "i64"], dict(BLOCK=4096, OUT_BF16=False), 8),
]
out = {}
for i, (kernel, types, consts, warps) in enumerate(CASES):
    name = f"{kernel.fn.__name__}[{i}]"
    names = [n for n, p in zip(kernel.arg_names, kernel.params) if not p.is_constexpr]
    if len(names) != len(types):
        out[name] = f"signature: {len(types)} types for {names}"
        continue
    sig = {**dict(zip(names, types)), **{k: "constexpr" for k in consts}}
    try:
        k = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=H100,
                           options=dict(num_warps=warps, enable_fp_fusion=False))
        out[name] = "ok" if k.asm.get("cubin") else "no cubin"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        out[name] = "no ptxas" if "ptxas" in msg.lower() and "error" not in msg.lower() else msg[-1500:]
print("RESULT " + json.dumps(out))
"""


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    if set(result.values()) == {"no ptxas"}:
        pytest.skip("this triton build has no ptxas")
    assert len(result) == 18
    bad = {k: v for k, v in result.items() if v not in ("ok", "no ptxas")}
    assert not bad, bad
