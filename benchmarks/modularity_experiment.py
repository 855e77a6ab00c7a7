"""The modularity-loss experiment: the bundled model fine-tuned with and without the loss.

For each weight (0 is the control) the shipped checkpoint is fine-tuned on the four-task mix
with ``train_modular``; the table reports the loss's cross-module fraction, the channel graph's
modularity z-score (Newman's Q against the edge-permutation null, 4 modules found by the graph's
own Gomory–Hu rule), the z-score of the loss's modules scored on the graph
(``graph.modularity(modules=loss.modules())``: data strengths, and static strengths with the
permutation and the rotation nulls), accuracy per
task, and the adjusted Rand index between the graph's modules and each channel's task (the
task whose circuit routes touch it most, "shared" when none has half its touches, "unused"
when no circuit touches it). Aims: cross-module fraction at least halved, z-score up by >= 3,
at most 2 points of accuracy lost on any task.

    nice .venv/bin/python benchmarks/modularity_experiment.py            # full (~minutes per weight)
    nice .venv/bin/python benchmarks/modularity_experiment.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import toy
from tl_modular.circuits import adjusted_rand_index
from tl_modular.training import ModularityLoss, graph_modularity, train_modular

N_MODULES = 4


def channel_tasks(model, tokens, mask, scored, n: int):
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(
        comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored, metric="logit", progress=False
    )
    tasks = {name: gen(n, seed=5) for name, gen in toy.GENERATORS.items()}
    circuits = graph.circuits(model, tasks, n_boot=20, n_random=2, batch_size=64, progress=False)
    touches: dict[str, Counter] = {}
    for task, circuit in circuits.items():
        for sender, port in circuit.routes:
            for ch in (sender, port.split(":")[0]):
                touches.setdefault(ch, Counter())[task] += 1
    out = {}
    for ch in tlm.training.unit_names(model):
        c = touches.get(ch)
        if not c:
            out[ch] = "unused"
            continue
        task, top = c.most_common(1)[0]
        out[ch] = task if top >= 0.5 * sum(c.values()) else "shared"
    return out, graph, circuits


def ari(modules, labels: dict[str, str]) -> float:
    of = {ch: i for i, group in enumerate(modules) for ch in group}
    names = sorted(labels)
    return adjusted_rand_index([of.get(n, -1) for n in names], [labels[n] for n in names])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps and weights (smoke run)")
    ap.add_argument("--weights", type=float, nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/_output/modularity_experiment.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.weights or ([0.0, 1.0] if args.quick else [0.0, 0.3, 1.0, 3.0])
    steps = args.steps or (100 if args.quick else 600)
    n = 32 if args.quick else 64
    graph_tokens = toy.mixed_tokens(n_per_task=n, seed=2, scored=True)
    base = toy.load_model()
    before = graph_modularity(
        base, *graph_tokens[:1], attention_mask=graph_tokens[1], loss_mask=graph_tokens[2], n_modules=N_MODULES
    )
    base_acc = toy.evaluate(base)
    loss0 = ModularityLoss(n_modules=N_MODULES)
    loss0.refresh(base)
    rows = [
        {
            "weight": "shipped",
            "cross_fraction": loss0.cross_fraction(base),
            "z": before["z"],
            "accuracy": base_acc,
            "seconds": 0.0,
        }
    ]
    models = {}
    for w in weights:
        model = toy.load_model()
        loss = ModularityLoss(n_modules=N_MODULES, refresh_every=50)
        t = time.perf_counter()
        result = train_modular(
            model,
            None,
            w,
            steps,
            loss=loss,
            graph_tokens=graph_tokens,
            graph_every=0,
            graph_n_modules=N_MODULES,
            eval_every=max(25, steps // 4),
            lr=3e-4,
            warmup=20,
            progress=not args.no_progress,
        )
        secs = time.perf_counter() - t
        last = result.history[-1]
        labels, graph, circuits = channel_tasks(model, *graph_tokens, n)
        gmods = graph.modules(n_modules=N_MODULES)
        static = tlm.build_graph(graph.compression, model=model)
        along = {"data": graph.modularity(n_null=50, modules=loss.modules(), progress=False)["Q"]["z"],
                 "static": static.modularity(n_null=50, modules=loss.modules(), progress=False)["Q"]["z"],
                 "rotate": static.modularity(n_null=50, modules=loss.modules(), null="rotate",
                                             progress=False)["Q"]["z"]}
        rows.append(
            {
                "weight": w,
                "cross_fraction": last["cross_fraction"],
                "z": last["graph"]["z"],
                "z_loss_modules": along,
                "crossing": last["graph"]["crossing"],
                "accuracy": last["accuracy"],
                "ari": ari(gmods, labels),
                "ari_loss": ari(loss.modules(), labels),
                "graph_modules": [sorted(m) for m in gmods],
                "modules": [sorted(m) for m in loss.modules()],
                "channel_task": labels,
                "seconds": secs,
            }
        )
        models[w] = (graph, circuits)
        print(
            json.dumps({k: v for k, v in rows[-1].items() if k not in ("modules", "graph_modules", "channel_task")}),
            flush=True,
        )
    diff = None
    try:
        if 0.0 in models and len(models) > 1:  # tlm.diff was written concurrently; optional here
            other = max(k for k in models if k > 0)
            (ga, ca), (gb, cb) = models[0.0], models[other]
            diff = tlm.diff(ga, gb, circuits_a=ca, circuits_b=cb, names=("control", f"weight {other}")).summary()
    except Exception as exc:  # noqa: BLE001 - the diff is optional here; say why it is missing
        diff = f"skipped: {type(exc).__name__}: {exc}"
    tasks = list(base_acc)
    print(
        "\n| weight | cross-module fraction | z-score (Q) | z of the loss's modules (data / static / rotate) "
        "| ARI graph modules~tasks | ARI loss modules~tasks | "
        + " | ".join(tasks)
        + " | s |"
    )
    print("|---" * (7 + len(tasks)) + "|")
    for r in rows:
        accs = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in tasks)
        along = r.get("z_loss_modules")
        along = " / ".join(f"{along[k]:.2f}" for k in ("data", "static", "rotate")) if along else "–"
        print(
            f"| {r['weight']} | {r['cross_fraction']:.3f} | {r['z']:.2f} | {along} | "
            f"{r.get('ari', float('nan')):.2f} | "
            f"{r.get('ari_loss', float('nan')):.2f} | "
            f"{accs} | {r['seconds']:.0f} |"
        )
    control = next((r for r in rows if r["weight"] == 0.0), rows[0])
    for r in rows[1:]:
        if r["weight"] in (0.0, "shipped"):
            continue
        drop = max(100 * (control["accuracy"][t] - r["accuracy"][t]) for t in tasks)
        print(
            f"weight {r['weight']}: cross fraction x{r['cross_fraction'] / control['cross_fraction']:.2f} "
            f"(aim <= 0.5), z {r['z'] - control['z']:+.2f} (graph's own modules), "
            f"{r['z_loss_modules']['data'] - control['z_loss_modules']['data']:+.2f} "
            "(loss's modules, data; aim >= +3), "
            f"worst accuracy drop {drop:.1f} points (aim <= 2)"
        )
    print("diff (control vs strongest weight):\n", diff)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "rows": rows, "diff": diff}, indent=1, default=str))


if __name__ == "__main__":
    main()
