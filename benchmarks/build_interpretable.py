"""The label → simulate → match → freeze loop on the bundled model: label scores against capability.

For each setting (match weight, neurons left free) the shipped checkpoint is rebuilt layer by layer
with ``tlm.training.build_interpretable`` on the workbench's four-task mix, with the offline labeler
and simulator (no LLM). Weight 0 is the control: the same freezing schedule and fine-tune without
the match term, so the capability cost of the labels is the difference to it. The table reports, per
layer, the label scores (held-out correlation of simulated and true activations; mean and median
over the constrained neurons) before and after, the fixed labels' fidelity on training contexts and
on held-out rows, the match term, and the original loss and accuracy per task (``tlm.toy.evaluate``)
of the final model against the shipped one.

    nice .venv/bin/python benchmarks/build_interpretable.py            # full (~2-3 min per setting)
    nice .venv/bin/python benchmarks/build_interpretable.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tl_modular import toy
from tl_modular.training import build_interpretable


def fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few neurons and steps (smoke run)")
    ap.add_argument("--weights", type=float, nargs="*", default=None, help="match weights (0: the control)")
    ap.add_argument("--keep-free", type=int, nargs="*", default=None, help="neurons per layer left free")
    ap.add_argument("--steps", type=int, default=None, help="steps per layer")
    ap.add_argument("--layers", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--neurons", type=int, default=None, help="label the first N neurons per layer (default all)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/_output/build_interpretable.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights if args.weights is not None else ([0.0, 10.0] if args.quick else [0.0, 1.0, 10.0])
    frees = args.keep_free if args.keep_free is not None else [0] if args.quick else [0, 32]
    steps = args.steps or (30 if args.quick else 200)
    neurons = args.neurons if args.neurons is not None else (48 if args.quick else None)
    if args.quick:
        frees = [min(f, 8) for f in frees]

    base = toy.load_model()
    shipped = toy.evaluate(base)
    runs, rows = [], []
    for weight in weights:
        for free in frees if weight > 0 else [0]:
            start = time.perf_counter()
            res = build_interpretable(base, None, layers=args.layers, steps_per_layer=steps, match_weight=weight,
                                      keep_free=free, neurons=neurons, progress=not args.no_progress)
            took = time.perf_counter() - start
            drop = {k: 100 * (shipped[k] - v) for k, v in res.final["accuracy"].items()}
            worst = max(drop, key=drop.get)
            runs.append({"weight": weight, "keep_free": free, "seconds": took, **res.to_json()})
            for r in res.layers:
                b, a = r.scores["before"], r.scores["after"]
                rows.append(f"| {weight:g} | {free} | L{r.layer} ({len(r.constrained)}) | {fmt(b['mean'])} → "
                            f"{fmt(a['mean'])} | {fmt(b['median'])} → {fmt(a['median'])} | "
                            f"{fmt(r.fidelity['train_before'])} → {fmt(r.fidelity['train_after'])} | "
                            f"{fmt(r.fidelity['heldout_before'])} → {fmt(r.fidelity['heldout_after'])} | "
                            f"{fmt(r.match_loss['before'], '.3g')} → {fmt(r.match_loss['after'], '.3g')} | "
                            f"{fmt(res.initial['loss'], '.3g')} → {fmt(res.final['loss'], '.3g')} | "
                            f"{worst} −{drop[worst]:.1f} | {took:.0f} s |")
            print(rows[-1], flush=True)
    header = ["| match weight | keep free | layer (constrained) | label score mean | label score median | "
              "fidelity (train) | fidelity (held-out) | match loss | original loss (model) | "
              "worst accuracy drop (points) | time |", "|---" * 11 + "|"]
    print("\n".join(header + rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shipped_accuracy": shipped, "steps_per_layer": steps, "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
