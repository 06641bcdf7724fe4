"""A Llama-3.2-1B-shaped model (transformers' class) initialized three ways.

    python -m benchmarks.materialize_llama                 # float32, CPU, the README table
    python -m benchmarks.materialize_llama --layers 4 --json out.json
    python -m benchmarks.materialize_llama --device cuda   # on a GPU

1. eager:    ``LlamaForCausalLM(config)`` (torch's default init, then ``_init_weights``);
2. meta:     ``with torch.device("meta")`` → ``to_empty`` → ``init_weights()``;
3. fastinit: ``deferred_init`` → ``materialize``.

Each method runs in a fresh process, so its peak memory (peak RSS above the
process's size before the model is built; on CUDA, peak allocated device
memory) is its own. Ratios are against the
fastinit time measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from ._args import check_device

METHODS = ("eager", "meta", "fastinit")


def llama_1b_config(layers: int = 16):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(method: str, layers: int, dtype_name: str, device_name: str) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    import fastinit

    dtype = getattr(torch, dtype_name)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    torch.set_default_dtype(dtype)
    cfg = llama_1b_config(layers)
    torch.manual_seed(0)
    if cuda:  # CUDA context and caching allocator up before the clock starts
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device) if cuda else _rss()
    out = {"method": method, "device": str(device)}
    t0 = time.perf_counter()
    if method == "eager":
        with device:
            model = LlamaForCausalLM(cfg)
    elif method == "meta":
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        model.to_empty(device=device)
        model.init_weights()
    else:
        model = fastinit.deferred_init(LlamaForCausalLM, cfg)
        out["deferred_init_s"] = time.perf_counter() - t0
        fastinit.materialize(model, device=device, seed=0)
    if cuda:
        torch.cuda.synchronize(device)
    out["seconds"] = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unique = {id(p): p for p in list(model.parameters()) + list(model.buffers())}.values()
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in unique)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["peak_extra_bytes"] = peak - base
    # A fast wrong answer must show: per-kind std of the weights.
    out["std_q_proj"] = model.model.layers[0].self_attn.q_proj.weight.float().std().item()
    out["std_embed"] = model.model.embed_tokens.weight.float().std().item()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child:  # the device is checked before the children start
        check_device(ap, args.device)
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.dtype, args.device)))
        return
    rows = []
    for m in args.methods.split(","):
        res = subprocess.run([sys.executable, "-m", "benchmarks.materialize_llama", "--child", m,
                              "--layers", str(args.layers), "--dtype", args.dtype, "--device", args.device],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"{m}: {rows[-1]['seconds']:.2f}s", file=sys.stderr, flush=True)
    ft = next(r for r in rows if r["method"] == "fastinit")["seconds"] if any(
        r["method"] == "fastinit" for r in rows) else None
    r0 = rows[0]
    print(f"Llama-3.2-1B shape, {args.layers} layers, {r0['params'] / 1e9:.2f}B params, "
          f"{r0['model_bytes'] / 2**30:.2f} GiB {args.dtype} on {args.device}")
    print("| method | seconds | fastinit speedup | peak extra memory / model bytes | std(q_proj) | std(embed) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = f"{r['seconds'] / ft:.2f}x" if ft else "-"
        extra = f" (deferred_init {r['deferred_init_s']:.2f}s)" if "deferred_init_s" in r else ""
        print(f"| {r['method']}{extra} | {r['seconds']:.2f} | {sp} | {r['peak_extra_bytes'] / r['model_bytes']:.3f} "
              f"| {r['std_q_proj']:.5f} | {r['std_embed']:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
