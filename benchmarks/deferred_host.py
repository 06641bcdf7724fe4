"""Host cost of deferred init, where the fills themselves cost nothing.

    python -m benchmarks.deferred_host            # the README table
    python -m benchmarks.deferred_host --repeat 9 --json out.json
    python -m benchmarks.deferred_host --only record --repeat 21
    python -m benchmarks.deferred_host --stages      # where materialize's time goes

On a GPU an 8B model's fills take milliseconds, so what decides the wall time is
what the host does around them: recording a model's construction and planning
its materialization. Two rows, each a ratio against torch measured in the same
run, interleaved call by call (medians):

1. ``record``: ``fastinit.deferred_init(LlamaForCausalLM, cfg)`` of the
   Llama-3-8B structure (hidden 4096, 32 layers, vocab 128256; meta, no memory)
   against ``with torch.device("meta"): LlamaForCausalLM(cfg)``. Goal ≤ 1.5×.
2. ``materialize``: ``fastinit.materialize(model, device="cpu", seed=0)`` of a
   32-layer Llama with tiny dims (hidden 64: 291 tensors, fills negligible)
   against torch's ``to_empty(device="cpu")`` + ``init_weights()`` of the same
   meta model. Goal ≤ 0.5×. A third row, informative, times the same with
   fastinit's engine fills stubbed: at these dims the fills are not negligible
   (1.2M normal draws, about as many as ``init_weights`` makes at the same
   per-element cost), so it shows what the host alone adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings

GOALS = {"record": 1.5, "materialize": 0.5, "host": None}  # host: informative, no goal


def llama_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=128)


def _timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rows(repeat: int, only: str = "") -> list[dict]:
    import torch
    from transformers import LlamaForCausalLM

    import fastinit
    from fastinit import engines

    big, tiny = llama_8b_config(), tiny_llama_config()

    def torch_record():
        with torch.device("meta"):
            LlamaForCausalLM(big)

    def ours_record():
        fastinit.deferred_init(LlamaForCausalLM, big)

    def torch_materialize(m):
        m.to_empty(device="cpu")
        m.init_weights()

    def ours_materialize(m):
        fastinit.materialize(m, device="cpu", seed=0)

    def meta_tiny():
        with torch.device("meta"):
            return LlamaForCausalLM(tiny)

    def ours_host_only(m):  # the same, every engine fill a no-op: what the host adds
        real_fill = engines.fill
        engines.fill = lambda targets, progress=None: None
        try:
            ours_materialize(m)
        finally:
            engines.fill = real_fill

    out = []
    cases = [
        ("record", "deferred_init, Llama-3-8B structure (meta)", "meta construction",
         lambda: torch_record, lambda: ours_record),
        ("materialize", "materialize, 32-layer Llama hidden 64 (291 tensors)", "to_empty + init_weights",
         lambda: (lambda m=meta_tiny(): torch_materialize(m)),
         lambda: (lambda m=fastinit.deferred_init(LlamaForCausalLM, tiny): ours_materialize(m))),
        ("host", "  the same, fastinit's fills stubbed (host cost alone)", "to_empty + init_weights",
         lambda: (lambda m=meta_tiny(): torch_materialize(m)),
         lambda: (lambda m=fastinit.deferred_init(LlamaForCausalLM, tiny): ours_host_only(m))),
    ]
    for key, what, base, make_torch, make_ours in cases:
        if only and key != only:
            continue
        make_torch()()  # warm both paths (imports, caches) before the clock
        make_ours()()
        t_torch, t_ours = [], []
        for _ in range(repeat):  # interleaved: drifts of this machine hit both alike
            f = make_torch()
            t_torch.append(_timed(f))
            f = make_ours()
            t_ours.append(_timed(f))
        a, b = statistics.median(t_torch), statistics.median(t_ours)
        out.append({"row": key, "what": what, "torch": base, "torch_ms": a * 1e3, "fastinit_ms": b * 1e3,
                    "ratio": b / a, "goal": GOALS[key],
                    "met": None if GOALS[key] is None else b / a <= GOALS[key]})
    return out


STAGES = [("deferred.api", "_walk"), ("deferred.api", "_objects"), ("deferred.api", "_prepare"),
          ("deferred.api", "_plans"), ("deferred.api", "_check"), ("deferred.api", "_compute"),
          ("engines", "fill"), ("distributed", "allocate_like"), ("distributed", "replay_into"),
          ("deferred.api", "as_module_tensor"), ("deferred.api", "swap_in")]


def stages(repeat: int) -> list[tuple[str, float]]:
    """Median ms per call of ``materialize`` (the tiny Llama) and of its stages, each
    timed by a wrapper around the function (``_compute`` includes the engine fill,
    allocation, replays and dressing the tensors; the wrappers add ~1 us a call)."""
    import importlib
    from collections import defaultdict

    from transformers import LlamaForCausalLM

    import fastinit

    spent: dict[str, list[float]] = defaultdict(list)
    run: dict[str, float] = defaultdict(float)
    saved = []
    for mod_name, fn_name in STAGES:
        mod = importlib.import_module(f"fastinit.{mod_name}")
        real = getattr(mod, fn_name)

        def timed(*a, _real=real, _label=f"{mod_name}.{fn_name}", **k):
            t0 = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                run[_label] += time.perf_counter() - t0

        saved.append((mod, fn_name, real))
        setattr(mod, fn_name, timed)
    try:
        cfg = tiny_llama_config()
        for i in range(repeat + 1):
            m = fastinit.deferred_init(LlamaForCausalLM, cfg)
            run.clear()
            spent["materialize (whole call)"].append(_timed(lambda: fastinit.materialize(m, device="cpu", seed=0)))
            if i:  # (the first call warms caches)
                for k, v in run.items():
                    spent[k].append(v)
            else:
                spent["materialize (whole call)"].clear()
    finally:
        for mod, fn_name, real in saved:
            setattr(mod, fn_name, real)
    return [(k, statistics.median(v) * 1e3) for k, v in spent.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7, help="interleaved runs per side (median; default 7)")
    ap.add_argument("--only", choices=sorted(GOALS), help="run this row only")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--stages", action="store_true",
                    help="instead: materialize's time by stage (tiny Llama, median of --repeat)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    warnings.filterwarnings("ignore")
    if args.stages:
        for label, ms in stages(args.repeat):
            print(f"{label:<40} {ms:8.2f} ms")
        return 0
    res = rows(args.repeat, args.only or "")
    print(f"{'row':<58} {'torch':>24} {'ms':>8} {'fastinit ms':>12} {'ratio':>7} {'goal':>6}")
    for r in res:
        print(f"{r['what']:<58} {r['torch']:>24} {r['torch_ms']:8.1f} {r['fastinit_ms']:12.1f} "
              f"{r['ratio']:6.2f}x {'' if r['goal'] is None else '<=' + format(r['goal'], 'g'):>6}"
              f"{'  (not met)' if r['met'] is False else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
