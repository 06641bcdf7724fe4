"""Predict the kernels' bound on an H200 from their sm_90 machine code, no GPU needed.

    python -m benchmarks.sass_count [--json PATH] [--sass DIR] [--check]

Builds ``fastinit.kernels.philox_fill``'s kernels for sm_90 (the H100/H200)
with Triton's own compiler (``GPUTarget("cuda", 90, 32)``: Triton -> PTX ->
the ``ptxas`` Triton ships), reads back ``ptxas -v`` (registers, spills) and
the SASS (``cuobjdump -sass``), and counts, per element, the instructions a
thread issues on the fast path (aligned, unmasked blocks: the shortest path
from the entry to an ``EXIT`` through the widest global store; for the
truncated normal also the path through its second polynomial, which the
default wide bounds take). Instructions are grouped by the pipe that executes
them (see ``cycles``: one issue per scheduler per clock, 16-lane ALU and
FMA-heavy pipes, FP32 on both FMA pipes, the 4-lane XU for MUFU and
conversions), and each resource's cycles give the element rate it allows at
132 SMs x 4 schedulers x 1.98 GHz. The slowest of these and the store bound
(torch's memset as measured on an H200: 4.63 TB/s in float32, 3.36 TB/s in
bfloat16; HBM3e peak 4.8 TB/s) is the prediction: a model that assumes every
resource busy every cycle, so an upper bound on the rate, not a measurement.
"issue busy at memset rate" is the share of every scheduler's cycles the fill
needs to keep up with memset: near or above 100%, the kernel cannot.

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

# H200 (SXM): 132 SMs, 4 schedulers each, boost clock, HBM3e (4.8 TB/s peak).
SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
HBM_PEAK = 4.8e12
# What the goals compare with: torch's zero_() of the same 2 GiB tensor, as
# measured on an H200 (benchmarks/gpu_check.py, README's GPU section).
MEMSET = {"float32": 4.633e12, "bfloat16": 3.359e12}
GOAL_PCT = {"float32": 85, "bfloat16": 70}
# Cycles one warp instruction keeps a pipe of one SM sub-partition (scheduler)
# busy, sm_90: 16-lane ALU and FMA-heavy pipes (2 cycles), FP32 on both FMA
# pipes (heavy + lite, so 1 cycle when the two are free), the 4-lane XU for
# MUFU and I2F/F2I (8 cycles; 16 per SM per clock in the CUDA C Programming
# Guide's throughput table). IMAD.WIDE (a 64-bit result) is counted as two
# IMADs. One instruction issues per scheduler per cycle.
KINDS = {"uniform": 1, "normal": 2, "trunc_normal": 3, "constant": 0}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Paths beyond the shortest one: (row label, opcode a block on the path must hold).
VARIANTS = {"trunc_normal": [("trunc_normal, some w >= 5 (default +-100 sigma)", "MUFU.SQRT")]}


def pipe_of(op: str) -> str:
    """The pipe class of an opcode (``MUFU.LG2``, ``IMAD.WIDE.U32``...):
    alu, imad, imad_wide, fp32, xu, or other (memory, branches, the uniform
    datapath: an issue slot each, no arithmetic pipe of the sub-partition)."""
    base = op.split(".")[0]
    if base in ("MUFU", "I2F", "F2I", "F2F"):  # (I2FP, sm_86+'s integer-pipe conversion, is alu)
        return "xu"
    if base == "IMAD":
        return "imad_wide" if op.startswith("IMAD.WIDE") else "imad"
    if base in ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2"):
        return "fp32"
    if base.startswith("U") or base in ("BRA", "EXIT", "STG", "LDG", "LDC", "S2R", "S2UR", "NOP", "BSSY",
                                        "BSYNC", "CALL", "RET", "BAR", "WARPSYNC", "STS", "LDS", "ST", "LD",
                                        "STL", "LDL", "DEPBAR", "MEMBAR", "CS2R", "SHFL", "R2UR", "ELECT",
                                        "VOTE", "VOTEU"):
        return "other"
    return "alu"  # IADD3 LOP3 SHF ISETP LEA SEL PRMT MOV I2FP FMNMX FSEL FSETP F2FP VIADD PLOP3 ...


def cycles(counts: dict) -> dict:
    """Cycles of one scheduler per warp, per resource, for these instruction counts."""
    imad = counts.get("imad", 0) + 2 * counts.get("imad_wide", 0)
    fp32 = counts.get("fp32", 0)
    return {"issue": sum(counts.values()), "alu": 2 * counts.get("alu", 0), "fma heavy": 2 * imad,
            "fma": imad + fp32, "xu": 8 * counts.get("xu", 0)}


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


def fast_path(insns, require: str | None = None) -> list:
    """Instructions on the shortest path from the entry to an EXIT that goes
    through the widest global store (the aligned, unmasked block) and, if
    ``require`` is given, through a block holding that opcode."""
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

    need = [s for s, blk in blocks.items() if any(op.startswith(require) for _a, _p, op, _r in blk)] \
        if require else [0]
    best = None
    for sb in store_blocks:
        for rb in need:
            parts = [shortest(0, rb), shortest(rb, sb), shortest(sb, "exit")]
            if None in parts:
                continue
            path = parts[0] + parts[1][1:] + parts[2][1:]
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
                  ONE_ROW=True, num_warps=pf.NUM_WARPS, **pf._COMPILE_OPTIONS)
    return args, kwargs


def batch_kernel_args(dtype):
    from fastinit.kernels import philox_fill as pf

    ts = [torch.empty(5000, dtype=dtype), torch.empty(3, dtype=dtype)]
    grid, args, kwargs = pf.launch_args(ts, [(0, 1, 5000, 5000), (7, 1, 3, 3)], [1, 2], [5, 6],
                                        [0.5] * (2 * pf.N_PARAMS))
    return args, kwargs


def predict(path, per_thread: int, size: int, dtype: str) -> dict:
    """Counts per element on ``path`` and the element rate each resource allows."""
    counts: dict[str, int] = {}
    for _a, _p, op, _r in path:
        k = pipe_of(op)
        counts[k] = counts.get(k, 0) + 1
    cyc = cycles(counts)
    # Elements per second over the whole GPU if only that resource counted:
    # a warp writes 32 * per_thread elements in cyc[r] cycles of its scheduler.
    limits = {r: SMS * SCHEDULERS * CLOCK_HZ * 32 * per_thread / c for r, c in cyc.items() if c}
    memset = MEMSET[dtype] / size
    compute = min(limits.values())
    return dict(insns_per_element=round(len(path) / per_thread, 2),
                per_element={k: round(v / per_thread, 2) for k, v in sorted(counts.items())},
                limits_Gelem_s={k: round(v / 1e9) for k, v in limits.items()},
                memset_Gelem_s=round(memset / 1e9), bound=min(limits, key=limits.get),
                issue_use_at_memset=round(100 * memset / limits["issue"]),
                predicted_GBps=round(min(compute, memset) * size / 1e9),
                predicted_pct_memset=round(100 * min(compute, memset) / memset))


def analyse(name, kernel, args, kwargs, dtype, sass_dir=None, variants=()) -> list[dict]:
    """Rows for one kernel: its fast path, then each ``(label, required opcode)`` variant."""
    from fastinit.kernels import philox_fill as pf

    ptx, cubin, log, sass = build(kernel, args, kwargs)
    if sass_dir:
        os.makedirs(sass_dir, exist_ok=True)
        with open(os.path.join(sass_dir, f"{name}.sass"), "w") as f:
            f.write(sass)
    insns = parse_sass(sass)
    per_thread = 4 * pf.CALLS // (32 * pf.NUM_WARPS)  # elements a thread writes per program
    size = torch.tensor([], dtype=dtype).element_size()
    facts = ptxas_facts(log)
    common = dict(kernel=name, dtype=str(dtype).replace("torch.", ""), registers=facts["registers"],
                  spill_stores=facts["spill_stores"], spill_loads=facts["spill_loads"],
                  stack_frame=facts["stack_frame"],
                  local_memory_insns=sum(1 for _a, _p, op, _r in insns if op.startswith(("STL", "LDL"))),
                  ptx_stores=sorted(set(re.findall(r"st\.global[.\w]*", ptx))),
                  static_insns=len(insns), elements_per_thread=per_thread)
    rows = []
    for label, require in [(None, None), *variants]:
        path, widest = fast_path(insns, require)
        rows.append(dict(common, variant=label, widest_store_bits=widest, path_insns=len(path),
                         **predict(path, per_thread, size, common["dtype"])))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--sass", help="write each kernel's SASS into this folder")
    ap.add_argument("--check", action="store_true", help="fail unless vector stores and no spills everywhere")
    args = ap.parse_args(argv)
    import triton

    from fastinit.kernels import philox_fill as pf

    rows = []
    for dname, dtype in DTYPES.items():
        for kname, kind in KINDS.items():
            a, kw = one_kernel_args(dtype, kind)
            rows += analyse(f"one_{kname}_{dname}", pf._fill_one_kernel, a, kw, dtype, args.sass,
                            VARIANTS.get(kname, ()))
        a, kw = batch_kernel_args(dtype)
        rows += analyse(f"batch_{dname}", pf._fill_kernel, a, kw, dtype, args.sass)
    print(f"triton {triton.__version__}, sm_90 (H200: {SMS} SMs x {SCHEDULERS} schedulers at "
          f"{CLOCK_HZ / 1e9:.2f} GHz); CALLS={pf.CALLS}, num_warps={pf.NUM_WARPS}: "
          f"{rows[0]['elements_per_thread']} elements per thread; memset as measured on an H200: "
          + ", ".join(f"{d} {v / 1e12:.2f} TB/s" for d, v in MEMSET.items()))
    print("| fill | dtype | regs | spills | widest store | instructions / element | alu | imad (wide) | fp32 | xu "
          "| G elements/s allowed by issue, alu, fma, xu | memset G elements/s | bound | issue busy at memset rate "
          "| predicted % of memset (goal) |")
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---|---:|---:|")
    for r in rows:
        if r["kernel"].startswith("batch"):
            label = "batch kernel (shortest kind)"
        else:
            label = r["variant"] or r["kernel"][4:].rsplit("_", 1)[0]
            if label == "trunc_normal":  # its shortest path: a window inside about +-2.7 sigma
                label = "trunc_normal (+-2 sigma)"
        pe, lim = r["per_element"], r["limits_Gelem_s"]
        allowed = ", ".join(str(lim.get(k, "-")) for k in ("issue", "alu", "fma", "xu"))
        if lim.get("fma heavy", 1e30) < lim.get("fma", 1e30):
            allowed += f" (fma heavy {lim['fma heavy']})"
        compute_bound = min(lim, key=lim.get)
        bound = "memory" if r["predicted_pct_memset"] >= 100 else compute_bound
        print(f"| {label} | {r['dtype']} | {r['registers']} | {r['spill_stores'] + r['spill_loads']} "
              f"| {r['widest_store_bits']}-bit | {r['insns_per_element']} | {pe.get('alu', 0)} | "
              f"{pe.get('imad', 0)} ({pe.get('imad_wide', 0)}) | {pe.get('fp32', 0)} | {pe.get('xu', 0)} | "
              f"{allowed} | {r['memset_Gelem_s']} | {bound} | {r['issue_use_at_memset']}% | "
              f"{r['predicted_pct_memset']}% ({GOAL_PCT[r['dtype']]}%) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check:
        bad = [r["kernel"] for r in rows
               if r["spill_stores"] or r["spill_loads"] or r["local_memory_insns"] or r["widest_store_bits"] < (
                   128 if r["dtype"] == "float32" else 64)]
        print("check:", "ok" if not bad else f"FAILED for {sorted(set(bad))}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
