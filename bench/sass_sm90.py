"""MSA kernels compiled for Hopper on any machine, no GPU needed: the per-step loops in SASS
(instructions, predicate packing, spills, shuffles) of the sm90 Gluon attention forward with and
without the block mass, and of the Triton block-scores forward and backward.

    pip install --no-deps --target /tmp/t36 triton==3.6.0   # the Triton the kernels are written for
    PYTHONPATH=/tmp/t36:$PWD python bench/sass_sm90.py

(chmod +x /tmp/t36/triton/backends/nvidia/bin/* if the install dropped the exec bits.) A static
measure, for CPU-side kernel work between GPU sessions: what the step costs in instructions, not
in time. It found the mass fold's predicate packing and the scores backward's spills (bench/NOTES_msa.md,
round 6).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.msa.dispatch import _GLUON_TRITON  # noqa: E402


OPS = ("HGMMA", "LOP3", "FSEL", "SHFL", "MUFU", "LDL", "STL")


def loop_stats(sass: str, wgmma: int = 16) -> list[dict]:
    """Per backward branch whose body holds the step's products (`wgmma` instructions): the
    body's instruction count and a few opcodes' counts."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (a, text) in enumerate(ins):
        target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1]) if "BRA" in text else None
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in at:
            body = ins[at[int(target.group(1), 16)]:i + 1]
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for _, t in body)
            if ops["HGMMA"] == wgmma:
                loops.append(dict(instructions=len(body), **{k: ops[k] for k in OPS}))
    return loops


def _specialised(fn, args: dict, consts: dict):
    """(signature, constexprs, attrs) as a launch specialises them: 16-byte aligned pointers,
    integers divisible by 16."""
    from triton.runtime.jit import mangle_type

    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else mangle_type(args[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and not sig[n].startswith("tensordesc")
             and (isinstance(args[n], torch.Tensor) or (isinstance(args[n], int) and args[n] > 0 and args[n] % 16 == 0))}
    return sig, {(names.index(n),): v for n, v in consts.items()}, attrs


def compile_forward(mass: bool, S: int = 4096, Hq: int = 48, G: int = 8, D: int = 128, K: int = 16, bs: int = 128):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from model.msa.ops import attention_sm90 as A

    q = torch.empty(1, S, Hq, D, dtype=torch.bfloat16)
    kv = A.kv_descriptor(torch.empty(1, S, G, D, dtype=torch.bfloat16), bs)
    i32, f32 = torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.float32)
    args = dict(Q=q, k_desc=kv, v_desc=kv, Sel=torch.empty(1, G, S, K, dtype=torch.int32), Union=i32, Count=i32,
                Out=q, Lse=f32, Mass=f32, S=S, block_size=bs, n_tiles=S // 128, n_items=G * S // 128, W=64,
                qk_scale2=0.1)
    consts = dict(G=G, HPG=Hq // G, D=D, TOPK=K, SEL_W=16, BLOCK_M=128, BLOCK_N=bs, NS=2, MASS=mass)
    src = GluonASTSource(A._msa_attn_fwd_sm90_kernel, *_specialised(A._msa_attn_fwd_sm90_kernel, args, consts))
    # the launcher's options (attention_sm90.attn_fwd)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168))


def compile_scores(backward: bool, S: int = 4096, G: int = 8, DI: int = 128, K: int = 16, bs: int = 128):
    """The Triton block-scores kernel (forward, or backward) with the launchers' bf16 tiles."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from model.msa.ops import common
    from model.msa.ops import indexer as X

    iq = torch.empty(1, S, G, DI, dtype=torch.bfloat16)
    ik = torch.empty(1, S, DI, dtype=torch.bfloat16)
    i32, f32 = torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.float32)
    shape = dict(G=G, DI=DI, TOPK=K, TOPK_P2=16, BLOCK_N=bs, DOT_PREC="tf32")
    if backward:  # indexer.block_scores_backward: 128-token tiles (the plan's), 4 warps
        fn = X._msa_block_scores_bwd_kernel
        args = dict(IQ=iq, IK=ik, Sel=i32, Arg=torch.empty(4, dtype=torch.int64), dScore=f32, Union=i32, Count=i32,
                    dIQ=iq, dIK32=f32, S=S, SK=S, block_size=bs, n_tiles=S // 128, W=64)
        consts, options = dict(shape, BLOCK_T=128), dict(num_warps=4)
    else:  # indexer.block_scores_argmax: common.SELECT_TILE
        tile = common.SELECT_TILE
        fn = X._msa_block_scores_kernel
        args = dict(IQ=iq, IK=ik, Sel=i32, Union=i32, Count=i32, Score=f32, Arg=torch.empty(4, dtype=torch.int64),
                    S=S, q_off=0, block_size=bs, n_tiles=S // tile["block_t"], W=64)
        consts = dict(shape, BLOCK_T=tile["block_t"], SUB_N=tile["sub_n"])
        options = dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return triton.compile(ASTSource(fn, *_specialised(fn, args, consts)), target=GPUTarget("cuda", 90, 32),
                          options=options)


def main() -> None:
    if not triton.__version__.startswith(_GLUON_TRITON):
        sys.exit(f"triton {triton.__version__}: the Gluon kernels are written for {_GLUON_TRITON}; see the docstring")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    cases = [("attention forward (sm90 Gluon)", lambda: compile_forward(False), 16),
             ("attention forward with the block mass (sm90 Gluon)", lambda: compile_forward(True), 16),
             ("block scores forward (Triton)", lambda: compile_scores(False), 8),
             ("block scores backward (Triton)", lambda: compile_scores(True), 16)]
    for i, (name, build, wgmma) in enumerate(cases):
        cubin = Path(f"/tmp/msa_sass_{i}.cubin")
        cubin.write_bytes(build().asm["cubin"])
        sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        res = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        print(f"{name}: registers {res.group(1)}, stack {res.group(2)} bytes; per-step loops: {loop_stats(sass, wgmma)}")


if __name__ == "__main__":
    main()
