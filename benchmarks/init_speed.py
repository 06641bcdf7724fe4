"""Drop-in speed: fastinit against torch.nn.init on one big tensor, same run.

    python -m benchmarks.init_speed            # 64M elements, the README table
    python -m benchmarks.init_speed --numel 16777216 --repeat 7 --json out.json
    python -m benchmarks.init_speed --only f32 --repeat 11
    python -m benchmarks.init_speed --only apply --repeat 21   # model.apply(init_weights) rows

Each case times torch and fastinit on the same tensor in ``--repeat`` rounds;
a round runs torch twice and then fastinit twice and times only the second call
of each, so both libraries meet the same machine (slow phases of a shared host
hit both) and neither pays for the switch (a VM parks an idle core, and the first
multithreaded call after a single-threaded one wakes it; compare with --interleave). It prints the medians and the ratio
torch / fastinit (> 1: fastinit is faster). ``--interleave`` times every call,
alternating the libraries call by call.

The ``apply`` rows time ``model.apply(init_weights)`` on whole models, with the
same ``init_weights`` written against ``torch.nn.init`` and against fastinit: a
40-conv CNN with BatchNorm (162 tensors, 1.4M parameters: kaiming_normal_
fan_out on the convs, ones_/zeros_ on BatchNorm and biases, xavier_uniform_ on
the head) and BERT-base (199 tensors, 110M parameters: normal_(0, .02) on Linear
and Embedding weights, zeros_ on biases, ones_/zeros_ on LayerNorm). Their
speedup is torch's time over fastinit's, like the other rows'. The ``batched``
rows run fastinit's ``apply`` inside ``with fastinit.batched():`` (the same values,
one fused pass at the block's exit) against the same torch ``apply``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fastinit

from ._args import check_device

# (name, dtype, function name, positional args)
CASES = [
    ("kaiming_uniform_ f32", torch.float32, "kaiming_uniform_", ()),
    ("normal_ f32", torch.float32, "normal_", (0.0, 0.02)),
    ("uniform_ f32", torch.float32, "uniform_", (-0.1, 0.1)),
    ("xavier_normal_ f32", torch.float32, "xavier_normal_", ()),
    ("trunc_normal_ f32", torch.float32, "trunc_normal_", (0.0, 0.02, -0.04, 0.04)),
    ("trunc_normal_ std=.02 a=-2 b=2 f32", torch.float32, "trunc_normal_", (0.0, 0.02)),
    ("kaiming_uniform_ bf16", torch.bfloat16, "kaiming_uniform_", ()),
    ("normal_ bf16", torch.bfloat16, "normal_", (0.0, 0.02)),
    ("uniform_ bf16", torch.bfloat16, "uniform_", (-0.1, 0.1)),
    ("trunc_normal_ bf16", torch.bfloat16, "trunc_normal_", (0.0, 0.02, -0.04, 0.04)),
    ("trunc_normal_ std=.02 a=-2 b=2 bf16", torch.bfloat16, "trunc_normal_", (0.0, 0.02)),
]


# ------------------------------------------------------------ model.apply(init_weights)


def cnn(depth: int = 40, width: int = 64, classes: int = 10) -> torch.nn.Module:
    """``depth`` 3x3 convs (with bias) each followed by BatchNorm, then a linear head:
    40 convs of 64 channels are 162 tensors, 1.4M parameters."""
    layers, cin = [], 3
    for _ in range(depth):
        layers += [torch.nn.Conv2d(cin, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU()]
        cin = width
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, classes)]
    return torch.nn.Sequential(*layers)


def cnn_init(lib):
    def init_weights(m):
        if isinstance(m, torch.nn.Conv2d):
            lib.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            lib.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            lib.ones_(m.weight)
            lib.zeros_(m.bias)
        elif isinstance(m, torch.nn.Linear):
            lib.xavier_uniform_(m.weight)
            lib.zeros_(m.bias)
    return init_weights


class _BertLayer(torch.nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.query, self.key, self.value, self.out = (torch.nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)


def bert_base(vocab: int = 30522, d: int = 768, ff: int = 3072, layers: int = 12) -> torch.nn.Module:
    """BERT-base's tensors in plain torch (transformers' BertModel has the same 199)."""
    m = torch.nn.Module()
    m.word, m.position, m.token_type = (torch.nn.Embedding(n, d) for n in (vocab, 512, 2))
    m.ln = torch.nn.LayerNorm(d)
    m.layers = torch.nn.ModuleList(_BertLayer(d, ff) for _ in range(layers))
    m.pooler = torch.nn.Linear(d, d)
    return m


def bert_init(lib):
    def init_weights(m):
        if isinstance(m, torch.nn.Linear):
            lib.normal_(m.weight, 0.0, 0.02)
            lib.zeros_(m.bias)
        elif isinstance(m, torch.nn.Embedding):
            lib.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, torch.nn.LayerNorm):
            lib.ones_(m.weight)
            lib.zeros_(m.bias)
    return init_weights


# (name, model constructor, init_weights(lib), inside fastinit.batched())
APPLY_CASES = [
    ("apply: CNN 40 conv+BN (162 tensors)", cnn, cnn_init, False),
    ("apply: BERT-base (199 tensors)", bert_base, bert_init, False),
    ("apply in batched(): CNN 40 conv+BN", cnn, cnn_init, True),
    ("apply in batched(): BERT-base", bert_base, bert_init, True),
]


def _in_batched(fn):
    def run():
        with fastinit.batched():
            fn()
    return run


def measure_apply(case, repeat: int, device="cpu") -> dict:
    name, make, init, batched = case
    device = torch.device(device)
    model = make().to(device)
    n = sum(p.numel() for p in model.parameters())
    ours = lambda: model.apply(init(fastinit))  # noqa: E731
    if batched:
        ours = _in_batched(ours)
    theirs = lambda: model.apply(init(torch.nn.init))  # noqa: E731
    tf, tt = [], []
    for _ in range(repeat):
        for fn, times in ((theirs, tt), (ours, tf)):
            fn()
            times.append(time_call(fn, device))
    mt, mf = statistics.median(tt), statistics.median(tf)
    return {
        "case": name, "numel": n, "tensors": len(list(model.parameters())), "torch_s": mt, "fastinit_s": mf,
        "torch_Melem_s": n / mt / 1e6, "fastinit_Melem_s": n / mf / 1e6, "speedup": mt / mf,
    }


def shape_for(numel: int) -> tuple[int, int]:
    rows = 4096
    return rows, max(1, numel // rows)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(case, numel: int, repeat: int, device="cpu", interleave: bool = False) -> dict:
    name, dtype, fn_name, args = case
    device = torch.device(device)
    t = torch.empty(shape_for(numel), dtype=dtype, device=device)
    ours = lambda: getattr(fastinit, fn_name)(t, *args)  # noqa: E731
    theirs = lambda: getattr(torch.nn.init, fn_name)(t, *args)  # noqa: E731
    tf, tt = [], []
    if interleave:
        ours(), theirs()  # warm-up
        for _ in range(repeat):
            tt.append(time_call(theirs, device))
            tf.append(time_call(ours, device))
    else:
        for _ in range(repeat):
            for fn, times in ((theirs, tt), (ours, tf)):
                fn()  # untimed: the switch from the other library
                times.append(time_call(fn, device))
    mt, mf = statistics.median(tt), statistics.median(tf)
    n = t.numel()
    return {
        "case": name, "numel": n, "torch_s": mt, "fastinit_s": mf,
        "torch_Melem_s": n / mt / 1e6, "fastinit_Melem_s": n / mf / 1e6, "speedup": mt / mf,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=64 * 2**20, help="elements per tensor (default 64M)")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per library (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--interleave", action="store_true", help="alternate the libraries call by call")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    check_device(ap, args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.numel / 2**20:.0f}M elements, median of {args.repeat}"
          + (", interleaved" if args.interleave else ", paired rounds"))
    print("| case | torch M/s | fastinit M/s | speedup |\n|---|---:|---:|---:|")
    rows = []
    for case in [c for c in CASES if args.only in c[0]]:
        r = measure(case, args.numel, args.repeat, args.device, args.interleave)
        rows.append(r)
        print(f"| {r['case']} | {r['torch_Melem_s']:.0f} | {r['fastinit_Melem_s']:.0f} | {r['speedup']:.2f}x |",
              flush=True)
    for case in [c for c in APPLY_CASES if args.only in c[0]]:
        r = measure_apply(case, args.repeat, args.device)
        rows.append(r)
        print(f"| {r['case']} | {r['torch_Melem_s']:.0f} | {r['fastinit_Melem_s']:.0f} | {r['speedup']:.2f}x |",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
