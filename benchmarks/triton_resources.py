"""Compile every Triton TTT kernel ahead of time for Hopper (sm_90) on any machine, GPU or not, and
report what ptxas allots each: registers per thread, spilled bytes, shared memory.

    python benchmarks/triton_resources.py            # the shipped configurations, a markdown table
    python benchmarks/triton_resources.py --json     # one JSON line (the test suite reads it)

Triton's compiler runs on the CPU (triton.compile with an ASTSource and GPUTarget("cuda", 90, 32));
the ptxas in Triton's wheel assembles the PTX with -v. A spill means local-memory traffic inside
the hot loop, so the shipped configurations must have none. Do not run with TRITON_INTERPRET=1 (the
kernels would be interpreter functions, which have nothing to compile).
"""
import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vit3.ttt import conv_kernels as KC
from vit3.ttt import kernels as K
from vit3.ttt.triton_ops import Plan, covers

# (head width, RoPE, what ships it): ViT³-T and H-ViT³ (d 32, H-ViT³ with RoPE), ViT³-S/B and
# DiT3-S/B/L (64), DiT3-XL (72)
SHIPPED = [(32, False, "ViT³-T"), (32, True, "H-ViT³"), (64, False, "ViT³-S/B, DiT3-S/B/L"), (72, False, "DiT3-XL")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSORS = {"qkv", "dout", "out", "dqkv"}  # in the input dtype; every other pointer is float32
FLOATS = {"coef", "lr", "factor"}
INTS = {"N", "h", "w", "tiles", "stride", "out_stride", "C", "H", "quarter", "S", "wmod", "c"}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in TENSORS:
            sig[name] = "*" + dtype
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in INTS:
            sig[name] = "i32"
        else:
            sig[name] = "*fp32"
    return sig


def kernels_for(d: int, rope: bool, dtype: str) -> list[tuple[str, object, dict]]:
    """(name, kernel, constexprs) of every launch of one configuration, as triton_ops makes them."""
    p = Plan(1, 4096, 1, d, d, torch.device("cpu"), DTYPES[dtype])
    head = dict(d=d, DP=p.dp, RB=p.rb, BN=p.bn, ROPE=rope, PREC="ieee", num_warps=p.warps, num_stages=p.stages)
    conv = dict(CP=p.cp, CB=p.cb, BN=p.bnc, num_warps=p.conv_warps)
    return [
        ("head_fwd_reduce", K.head_fwd_reduce, head), ("head_fwd_apply", K.head_fwd_apply, head),
        ("head_bwd_q", K.head_bwd_q, head), ("head_bwd_k", K.head_bwd_k, head),
        ("conv_fwd_reduce", KC.conv_fwd_reduce, conv), ("conv_fwd_apply", KC.conv_fwd_apply, conv),
        ("conv_bwd_q", KC.conv_bwd_q, conv), ("conv_bwd_k", KC.conv_bwd_k, conv),
        ("finalize_fwd head", K.finalize_fwd,
         dict(d=d, M=p.dp, K=2 * p.dp, BK=min(2 * p.dp, 64), HEAD=True, ROPE=rope)),
        ("finalize_bwd head", K.finalize_bwd, dict(M=p.dp, K=2 * p.dp, BK=min(2 * p.dp, 64))),
        ("finalize_fwd conv", K.finalize_fwd, dict(d=d, M=16, K=p.cp, BK=p.cb, HEAD=False, ROPE=False)),
        ("finalize_bwd conv", K.finalize_bwd, dict(M=16, K=p.cp, BK=p.cb)),
    ]


def compile_sm90(kernel, dtype: str, launch: dict) -> dict:
    """Compile for sm_90 as triton_ops launches it (constexprs and num_warps) and read ptxas -v:
    registers, spill stores/loads (bytes), shared memory (bytes)."""
    options = {k: launch[k] for k in ("num_warps", "num_stages") if k in launch}
    constexprs = {k: v for k, v in launch.items() if k not in options}
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([str(PTXAS), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st, spill_ld = (int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return {"registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld,
            "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages}


def table(configs, dtypes) -> list[dict]:
    rows, seen = [], set()
    for d, rope, models in configs:
        for dtype in dtypes:
            if not covers(d, DTYPES[dtype]):  # the layer takes the fast path there
                continue
            for name, kernel, constexprs in kernels_for(d, rope, dtype):
                key = (name, dtype, tuple(sorted(constexprs.items())))
                if key in seen:  # the conv kernels do not depend on RoPE
                    continue
                seen.add(key)
                rows.append({"kernel": name, "d": d, "rope": rope, "dtype": dtype, "models": models,
                             **compile_sm90(kernel, dtype, constexprs)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args()
    rows = table(SHIPPED, args.dtypes)
    if args.json:
        print(json.dumps(rows))
        return
    print("| kernel | d | RoPE | dtype | registers | spills (st/ld B) | shared (B) | warps | stages |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['d']} | {'yes' if r['rope'] else 'no'} | {r['dtype']} | {r['registers']} | "
              f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {r['num_warps']} | {r['num_stages']} |")


if __name__ == "__main__":
    main()
