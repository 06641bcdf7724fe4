"""Predict the kernels' bound on an H200 from their sm_90 machine code, no GPU needed.

    python -m benchmarks.sass_count [--json PATH] [--sass DIR] [--check]

Builds ``fastinit.kernels.philox_fill``'s kernels for sm_90 (the H100/H200)
with Triton's own compiler (``GPUTarget("cuda", 90, 32)``: Triton -> PTX ->
the ``ptxas`` Triton ships), reads back ``ptxas -v`` (registers, spills) and
the SASS (``cuobjdump -sass``), and counts, per element, the instructions a
thread issues on the fast path (aligned, unmasked blocks: the shortest path
from the entry to an ``EXIT`` through the widest global store). Instructions
are grouped by the pipe that executes them, with sm_90's throughputs (CUDA C
Programming Guide, "Arithmetic Instructions", compute capability 9.0, per SM
per clock): FP32 add/mul/fma 128, 32-bit integer add/logic/shift/compare and
multiply-add 64, conversions int<->float32 and the special functions (MUFU:
lg2, sin, cos, rsqrt, rcp) 16; and one instruction per clock issued by each
of the 4 schedulers of an SM. The slowest of these, at 132 SMs and 1.98 GHz,
is the compute bound, compared with the store bound at HBM3e's 4.8 TB/s
(memset measured 4.6 TB/s in float32).

``--check`` exits non-zero unless every kernel stores aligned blocks with
vector stores and ptxas reports no spills (what tests/test_kernels.py checks).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (read when the kernels are imported)

import torch  # noqa: E402

# H200 (SXM): 132 SMs, 4 schedulers each, boost clock, HBM3e.
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
HBM_PEAK, MEMSET = 4.8e12, 4.6e12
# Throughput per SM per clock (CUDA C Programming Guide, compute capability 9.0).
PIPES = {
    "fp32": 128,  # FFMA FADD FMUL FMNMX FSEL FSETP ...
    "int": 64,  # IADD3 LOP3 SHF ISETP LEA SEL PRMT IMAD ... (integer multiply-add too)
    "xu": 16,  # MUFU.* I2F F2I: transcendental and conversion unit
}
KINDS = {"uniform": 1, "normal": 2, "trunc_normal": 3, "constant": 0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pipe_of(op: str) -> str | None:
    """The pipe an opcode (``MUFU.LG2``, ``IMAD.WIDE.U32``...) issues to; None
    for instructions that move no data through an arithmetic pipe (branches,
    stores, register moves done by the scheduler's uniform datapath)."""
    base = op.split(".")[0]
    if base in ("MUFU", "I2F", "F2I", "F2F"):  # (I2FP, sm_86's integer-pipe conversion, is not one)
        return "xu"
    if base.startswith("U") or base in ("BRA", "EXIT", "STG", "LDG", "LDC", "S2R", "S2UR", "NOP", "BSSY",
                                        "BSYNC", "CALL", "RET", "BAR", "WARPSYNC", "STS", "LDS", "ST", "LD",
                                        "STL", "LDL", "DEPBAR", "MEMBAR", "CS2R", "RPCMOV"):
        return None
    if base in ("FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "HADD2", "HFMA2", "HMUL2",
                "F2FP", "FSWZADD", "FRND"):
        return "fp32"
    return "int"  # IADD3 IMAD LOP3 SHF ISETP LEA SEL PRMT MOV I2FP PLOP3 POPC FLO VIADD ...


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> list[tuple[int, str | None, str, str]]:
    """``cuobjdump -sass`` of one function -> ``(address, predicate, opcode, operands)``."""
    out = []
    for line in text.splitlines():
        m = _INSN.search(line)
        if not m or line.lstrip().startswith("/* 0x"):
            continue
        body = m.group(2).strip()
        pred = None
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, rest = body.partition(" ")
        out.append((int(m.group(1), 16), pred, op, rest.strip()))
    return out


def fast_path(insns) -> list:
    """Instructions on the shortest path from the entry to an EXIT that goes
    through the widest global store (the aligned, unmasked block)."""
    addr_index = {a: i for i, (a, *_r) in enumerate(insns)}
    leaders = {0}
    for i, (a, pred, op, rest) in enumerate(insns):
        if op.startswith("BRA") or op.startswith("EXIT") or op.startswith("RET"):
            if i + 1 < len(insns):
                leaders.add(i + 1)
            if op.startswith("BRA"):
                t = int(rest.split()[-1].rstrip(";"), 16) if rest.split()[-1].startswith("0x") else None
                if t is not None and t in addr_index:
                    leaders.add(addr_index[t])
    starts = sorted(leaders)
    blocks = {s: insns[s:e] for s, e in zip(starts, starts[1:] + [len(insns)])}
    succ: dict[int, list] = {}
    for s, blk in blocks.items():
        a, pred, op, rest = blk[-1]
        end = s + len(blk)
        nxt = []
        if op.startswith("BRA"):
            tgt = rest.split()[-1]
            if tgt.startswith("0x") and int(tgt, 16) in addr_index:
                nxt.append(addr_index[int(tgt, 16)])
            if pred is not None and end < len(insns):
                nxt.append(end)
        elif op.startswith("EXIT") or op.startswith("RET"):
            if pred is not None and end < len(insns):
                nxt.append(end)
            nxt.append("exit")
        elif end < len(insns):
            nxt.append(end)
        succ[s] = nxt

    def width(op):
        m = re.match(r"STG\.E(?:\.[A-Z]+)*?\.(\d+)", op)
        return int(m.group(1)) if m else (32 if op.startswith("STG") else 0)

    widest = max(width(op) for _a, _p, op, _r in insns)
    store_blocks = {s for s, blk in blocks.items() if any(width(op) == widest for _a, _p, op, _r in blk)}

    blocks["exit"] = []

    def shortest(src, dst):  # Dijkstra, a block costing its instruction count
        import heapq

        dist, heap = {src: len(blocks[src])}, [(len(blocks[src]), str(src), src, [src])]
        while heap:
            d, _k, s, path = heapq.heappop(heap)
            if s == dst:
                return path
            for n in succ.get(s, []):
                nd = d + len(blocks[n])
                if nd < dist.get(n, 1 << 30):
                    dist[n] = nd
                    heapq.heappush(heap, (nd, str(n), n, path + [n]))
        return None

    best = None
    for sb in store_blocks:
        head, tail = shortest(0, sb), shortest(sb, "exit")
        if head is None or tail is None:
            continue
        path = head + tail[1:]
        n = sum(len(blocks[s]) for s in path)
        if best is None or n < best[0]:
            best = (n, path)
    return [i for s in best[1] for i in blocks[s]], widest


def tools():
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path, os.path.join(bindir, "cuobjdump")


def build(kernel, args, kwargs):
    """Compile ``kernel`` for sm_90 as a launch with ``args``/``kwargs`` would:
    ``(ptx, cubin, ptxas -v log, sass)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)  # what a real launch binds first
    options, sig, const, attrs = kernel._pack_args(backend, options, bound, spec, options)
    out = triton.compile(ASTSource(kernel, sig, const, attrs), target=target, options=options.__dict__)
    ptx, cubin = out.asm["ptx"], out.asm["cubin"]
    ptxas, cuobjdump = tools()
    with tempfile.TemporaryDirectory() as d:
        src, obj = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        # Triton's own ptxas flags (backends/nvidia/compiler.py make_cubin), plus -v.
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        log = subprocess.run([ptxas, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                              src, "-o", obj], capture_output=True, text=True, check=True).stderr
        with open(obj, "wb") as f:
            f.write(cubin)  # disassemble what Triton built, not our rebuild
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    return ptx, cubin, log, sass


def ptxas_facts(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0,
                stack_frame=int(stack.group(1)) if stack else 0)


def one_kernel_args(dtype, kind):
    """A drop-in call's launch of ``_fill_one_kernel`` (aligned tensor of 1M elements)."""
    from fastinit.kernels import philox_fill as pf

    t = torch.empty(1 << 20, dtype=dtype)
    bpr = pf.programs_per_row(0, 1, t.numel())
    args = (t, 1, 0, t.numel(), t.numel(), bpr, 5, 6, 0.5, 0.25, 0.75, 0.0, -1.0, 1.0)
    kwargs = dict(KIND=kind, OUT_DTYPE=pf._TL_DTYPES[dtype], IS_BF16=dtype == torch.bfloat16, CALLS=pf.CALLS,
                  num_warps=pf.NUM_WARPS, **pf._COMPILE_OPTIONS)
    return args, kwargs


def batch_kernel_args(dtype):
    from fastinit.kernels import philox_fill as pf

    ts = [torch.empty(5000, dtype=dtype), torch.empty(3, dtype=dtype)]
    grid, args, kwargs = pf.launch_args(ts, [(0, 1, 5000, 5000), (7, 1, 3, 3)], [1, 2], [5, 6],
                                        [0.5] * (2 * pf.N_PARAMS))
    return args, kwargs


def analyse(name, kernel, args, kwargs, dtype, sass_dir=None) -> dict:
    from fastinit.kernels import philox_fill as pf

    ptx, cubin, log, sass = build(kernel, args, kwargs)
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, f"{name}.sass"), "w") as f:
            f.write(sass)
    insns = parse_sass(sass)
    path, widest = fast_path(insns)
    per_thread = 4 * pf.CALLS // (32 * pf.NUM_WARPS)  # elements a thread writes per program
    counts: dict[str, int] = {}
    for _a, _p, op, _r in path:
        p = pipe_of(op)
        counts[p or "other"] = counts.get(p or "other", 0) + 1
    mufu = sum(1 for _a, _p, op, _r in path if op.startswith(("MUFU", "I2F", "F2I")) and not op.startswith("I2FP"))
    imul = sum(1 for _a, _p, op, _r in path if op.startswith("IMAD") and not op.startswith(("IMAD.MOV", "IMAD.IADD",
                                                                                           "IMAD.SHL")))
    size = torch.tensor([], dtype=dtype).element_size()
    per_elem = {k: v / per_thread for k, v in counts.items()}
    issue = len(path) / per_thread
    # Elements per second each resource allows, over the whole H200.
    lanes_per_s = SMS * CLOCK_HZ
    limits = {"issue": SMS * SCHEDULERS * 32 * CLOCK_HZ / issue}
    for p, rate in PIPES.items():
        if per_elem.get(p):
            limits[p] = lanes_per_s * rate / per_elem[p]
    limits["memory (memset)"] = MEMSET / size
    bound = min(limits, key=limits.get)
    facts = ptxas_facts(log)
    stores = sorted(set(re.findall(r"st\.global[.\w]*", ptx)))
    return dict(kernel=name, dtype=str(dtype).replace("torch.", ""), registers=facts["registers"],
                spill_stores=facts["spill_stores"], spill_loads=facts["spill_loads"],
                stack_frame=facts["stack_frame"],
                local_memory_insns=sum(1 for _a, _p, op, _r in insns if op.startswith(("STL", "LDL"))),
                ptx_stores=stores, widest_store_bits=widest, static_insns=len(insns), path_insns=len(path),
                elements_per_thread=per_thread, insns_per_element=round(issue, 2),
                per_element={k: round(v, 2) for k, v in sorted(per_elem.items())},
                xu_per_element=round(mufu / per_thread, 2), imad_per_element=round(imul / per_thread, 2),
                limits_Gelem_s={k: round(v / 1e9) for k, v in limits.items()}, bound=bound,
                predicted_GBps=round(min(limits.values()) * size / 1e9),
                predicted_pct_memset=round(100 * min(limits.values()) * size / MEMSET))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--sass", help="write each kernel's SASS into this folder")
    ap.add_argument("--check", action="store_true", help="fail unless vector stores and no spills everywhere")
    ap.add_argument("--only", choices=sorted(KINDS) + ["batch"], help="one kernel only")
    args = ap.parse_args(argv)
    import triton

    from fastinit.kernels import philox_fill as pf

    rows = []
    for dname, dtype in DTYPES.items():
        for kname, kind in KINDS.items():
            if args.only and args.only != kname:
                continue
            a, kw = one_kernel_args(dtype, kind)
            rows.append(analyse(f"one_{kname}_{dname}", pf._fill_one_kernel, a, kw, dtype, args.sass))
        if not args.only or args.only == "batch":
            a, kw = batch_kernel_args(dtype)
            rows.append(analyse(f"batch_{dname}", pf._fill_kernel, a, kw, dtype, args.sass))
    print(f"triton {triton.__version__}, sm_90 (H200: {SMS} SMs x {SCHEDULERS} schedulers at "
          f"{CLOCK_HZ / 1e9:.2f} GHz; memset {MEMSET / 1e12:.1f} TB/s), CALLS={pf.CALLS}, "
          f"num_warps={pf.NUM_WARPS}, {rows[0]['elements_per_thread']} elements per thread")
    print("| kernel | dtype | regs | spills | widest store | insns/elem | int | fp32 | xu | "
          "issue | int pipe | fp32 pipe | xu pipe | memset | bound | predicted % of memset |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        pe, lim = r["per_element"], r["limits_Gelem_s"]
        print(f"| {r['kernel'].split('_', 1)[1].rsplit('_', 1)[0] if r['kernel'].startswith('one_') else 'batch'} "
              f"| {r['dtype']} | {r['registers']} | {r['spill_stores'] + r['spill_loads']} "
              f"| {r['widest_store_bits']}-bit | {r['insns_per_element']} | {pe.get('int', 0)} | "
              f"{pe.get('fp32', 0)} | {pe.get('xu', 0)} | {lim['issue']} | {lim.get('int', '-')} | "
              f"{lim.get('fp32', '-')} | {lim.get('xu', '-')} | {lim['memory (memset)']} | {r['bound']} | "
              f"{min(100, r['predicted_pct_memset'])}% |")
    print("(pipe columns: G elements/s each resource allows over the whole GPU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check:
        bad = [r["kernel"] for r in rows
               if r["spill_stores"] or r["spill_loads"] or r["local_memory_insns"] or r["widest_store_bits"] < (
                   128 if r["dtype"] == "float32" else 64)]
        print("check:", "ok" if not bad else f"FAILED for {bad}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
