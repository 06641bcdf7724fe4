"""``fastinit compare``: the classic init-scheme experiment, reproducible in one command.

The same MLP (64 → 256 → 10, ReLU) is trained from each init scheme on
scikit-learn's bundled 8x8 handwritten digits (1797 images, no download) with
the same data order and seeds. All-zeros and all-ones initializations leave
every hidden unit identical (symmetry is never broken) and stay near chance;
uniform [0, 1) starts with huge, all-positive activations and lags; centring
helps; scaling by 1/sqrt(n) (the "general rule", normal(0, 1/sqrt n), Xavier,
Kaiming, torch's default) trains best. Adam, lr 1e-3, batches of 32, 2 epochs by
default, as in the classic comparison; trained in float64, so the table does not
depend on the CPU's vector instructions.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.nn as nn

import fastinit

HIDDEN = (256,)


def _fan_in(w: torch.Tensor) -> int:
    return w.shape[1]


SCHEMES = {
    "zeros": lambda w: fastinit.zeros_(w),
    "ones": lambda w: fastinit.ones_(w),
    "uniform [0, 1)": lambda w: fastinit.uniform_(w, 0.0, 1.0),
    "uniform [-0.5, 0.5)": lambda w: fastinit.uniform_(w, -0.5, 0.5),
    "general rule ±1/√n": lambda w: fastinit.uniform_(w, -1 / math.sqrt(_fan_in(w)), 1 / math.sqrt(_fan_in(w))),
    "normal(0, 1/√n)": lambda w: fastinit.normal_(w, 0.0, 1 / math.sqrt(_fan_in(w))),
    "xavier uniform": lambda w: fastinit.xavier_uniform_(w),
    "kaiming normal": lambda w: fastinit.kaiming_normal_(w, nonlinearity="relu"),
    "torch default": None,
}


def load_digits(seed: int):
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_val = len(x) // 5
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def make_mlp(scheme: str, seed: int, example_input=None) -> nn.Sequential:
    """The MLP initialized by ``scheme``: a row of the classic table (:data:`SCHEMES`)
    or a built-in scheme of :mod:`fastinit.schemes` (applied with ``seed``)."""
    torch.manual_seed(seed)
    dims = (64, *HIDDEN, 10)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    if scheme not in SCHEMES:
        opts = {"example_input": example_input} if scheme == "lsuv" else {}
        fastinit.apply_scheme(model, scheme, seed=seed, **opts)
        return model
    init = SCHEMES[scheme]
    if init is not None:
        for m in model:
            if isinstance(m, nn.Linear):
                init(m.weight)
                # Constant schemes set everything; the others keep biases at zero.
                if scheme in ("zeros", "ones"):
                    init(m.bias)
                else:
                    fastinit.zeros_(m.bias)
    return model


def train(scheme: str, data, epochs: int, seed: int, lr: float = 1e-3, batch: int = 32) -> dict:
    (xt, yt), (xv, yv) = data
    # Trained in float64: in float32, ATen's and MKL's vector kernels (AVX2 vs AVX-512
    # hosts) round differently, and the constant-init runs amplify an ulp into other
    # tables. The initial values are the float32 fills, exactly.
    xt, xv = xt.double(), xv.double()
    model = make_mlp(scheme, seed, example_input=xt[:256].float()).double()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed((seed + 1) % (1 << 64))  # seeds go up to 2**64 - 1
    curve = []
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
    with torch.no_grad():
        out = model(xv)
        val_loss = loss_fn(out, yv).item()
        acc = (out.argmax(1) == yv).float().mean().item()
    return {"scheme": scheme, "val_accuracy": acc, "val_loss": val_loss, "train_loss": curve}


def plot(results, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'torch-fastinit[compare]'): no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        c = r["train_loss"]
        k = max(1, len(c) // 100)  # moving average over ~1% of the steps
        smooth = [sum(c[i : i + k]) / len(c[i : i + k]) for i in range(0, len(c), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth,
                label=f"{r['scheme']} (val acc {100 * r['val_accuracy']:.0f}%)")
    ax.set_yscale("log")
    ax.set_xlabel("training step (batch of 32)")
    ax.set_ylabel("training loss (cross-entropy, log scale)")
    ax.set_title("Same MLP, same data, different init (sklearn digits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def split_schemes(values) -> list[str]:
    """The scheme names in ``--scheme`` values, separated by commas; a name that itself
    contains commas (the classic row ``"uniform [0, 1)"``) is matched whole first."""
    from .schemes import SCHEMES as BUILTIN

    known = set(SCHEMES) | set(BUILTIN)
    names = []
    for value in values:
        parts = value.split(",")
        i = 0
        while i < len(parts):
            # the longest run of comma-separated pieces that is a known name, else one piece
            j = next((j for j in range(len(parts), i, -1) if ",".join(parts[i:j]).strip() in known), i + 1)
            name = ",".join(parts[i:j]).strip()
            if name:
                names.append(name)
            i = j
    return names


def check_schemes(names) -> str | None:
    """An error line for names that are neither a classic row nor a built-in scheme."""
    from .schemes import SCHEMES as BUILTIN

    bad = [n for n in names if n not in SCHEMES and n not in BUILTIN]
    if bad:
        return (f"unknown scheme(s) {', '.join(map(repr, bad))}; built-in schemes: {', '.join(BUILTIN)}; "
                f"classic rows: {', '.join(map(repr, SCHEMES))}")
    dims = (64, *HIDDEN, 10)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], device="meta"), nn.ReLU()]
    probe = nn.Sequential(*layers[:-1])  # make_mlp's layers, on the meta device
    for n in names:
        if n in BUILTIN:
            try:
                BUILTIN[n]().plan(probe)  # a scheme that has no rule for the MLP's layers fails now, not mid-run
            except (ValueError, TypeError) as e:
                return f"scheme {n!r} does not fit the MLP: {e}"
    return None


def run(args) -> int:
    names = list(SCHEMES)
    if getattr(args, "scheme", None):
        names = split_schemes(args.scheme)
    try:
        data = load_digits(args.seed)
    except ImportError:
        print("fastinit compare needs scikit-learn (pip install 'torch-fastinit[compare]')", file=sys.stderr)
        return 2
    results = []
    print(f"MLP 64-{'-'.join(map(str, HIDDEN))}-10 on sklearn digits "
          f"({len(data[0][0])} train / {len(data[1][0])} validation), Adam lr 1e-3, batch 32, float64, "
          f"{args.epochs} epoch{'' if args.epochs == 1 else 's'}, seed {args.seed}")
    print("| scheme | val accuracy | val loss | last-epoch train loss |\n|---|---:|---:|---:|")
    for scheme in names:
        r = train(scheme, data, args.epochs, args.seed)
        results.append(r)
        per_epoch = max(1, len(r["train_loss"]) // args.epochs)
        last = r["train_loss"][-per_epoch:]
        print(f"| {scheme} | {100 * r['val_accuracy']:.1f}% | {r['val_loss']:.3f} | "
              f"{sum(last) / len(last):.3f} |", flush=True)
    if args.plot:
        if plot(results, args.plot):
            print(f"loss curves: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return 0
