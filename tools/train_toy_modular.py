"""Train the bundled model's modular variant (``tlm.toy.load_modular_model()``) and its SAEs.

    python tools/train_toy_modular.py [--weight 20] [--steps 1000] [--out tl_modular/toy/checkpoint_modular]

Continues the shipped workbench model on its four-task mix with ``tlm.training.train_modular``
(the channel-level modularity loss, 4 modules re-clustered every 50 steps, then frozen), checks
it, and writes ``model.safetensors`` + ``config.json`` (the measured facts under ``info``) and
one sae-lens SAE per hook the channels read (``saes/``). The checks, on the channel graph the
report builds (``tlm.report.bundled_inputs``' data, logit metric): every task ≥ 95% accurate
(held-out addition pairs included); at least 3 modules of the loss with 2 or more channels;
their z-score (Newman's Q of that fixed partition against the graph's edge-permutation null,
``graph.modularity(modules=...)``) ≥ 2 with p ≤ 0.05; and the graph's own Gomory–Hu rule
(``graph.modules()``, what the report shows) finding at least 3 modules. A run that misses a
bar exits 1 without writing into ``--out``. About 17 minutes on a busy, shared 2-core machine
(``--threads 1``: training 6.6, checks 0.1, four SAEs 10.5); ``--only-saes`` retrains the SAEs alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import sae as S
from tl_modular import toy
from tl_modular.circuits import adjusted_rand_index
from tl_modular.training import ModularityLoss, train_modular

#: The hooks the bundled model's channels read: heads read ``hook_resid_pre``, MLPs ``hook_resid_mid``.
HOOKS = [f"blocks.{layer}.{h}" for layer in (0, 1) for h in ("hook_resid_pre", "hook_resid_mid")]


def measure(model, modules, *, n_null: int, threads: int) -> dict:
    """The facts the tests assert, on the graph ``tl-modular analyze --model toy-modular`` builds."""
    torch.set_num_threads(threads)
    tokens, mask, scored = toy.mixed_tokens(n_per_task=128, seed=0, scored=True)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                            metric="logit", progress=False)
    fixed = graph.modularity(modules=modules, n_null=n_null, progress=False)
    found = graph.modules()
    own = graph.modularity(n_null=n_null, progress=False)
    names = sorted(set().union(*modules))
    of = lambda parts: {c: i for i, p in enumerate(parts) for c in p}  # noqa: E731
    a, b = of(modules), of(found)
    return {"loss_modules": [sorted(m) for m in modules],
            "loss_modules_Q": {k: round(float(v), 4) for k, v in fixed["Q"].items()},
            "graph_modules": [sorted(m) for m in found],
            "graph_modules_Q": {k: round(float(v), 4) for k, v in own["Q"].items()},
            "ari_graph_vs_loss": round(adjusted_rand_index([a[n] for n in names], [b.get(n, -1) for n in names]), 3),
            "n_null": n_null}


def train_saes(model, args) -> dict:
    """One SAE per hook the channels read, as ``tools/train_toy_saes.py`` trains the plain model's."""
    tokens, mask = toy.mixed_tokens(n_per_task=2048, seed=0)
    ev, evm, evs = toy.mixed_tokens(n_per_task=256, seed=1, scored=True)
    quality = {}
    for hook in HOOKS:
        t = time.perf_counter()
        cfg = S.SAETrainConfig(d_sae=args.d_sae, n_tokens=args.sae_tokens, l1_coefficient=3.0, lr=1e-3)
        sae = S.train_sae(model, tokens, hook, cfg, attention_mask=mask)
        sae.cfg.metadata.model_name = "tl_modular.toy.modular"
        S.save_atomic(sae, args.out / "saes" / hook)
        q = S.quality(model, sae, ev, attention_mask=evm, loss_mask=evs)
        quality[hook] = {"seconds": round(time.perf_counter() - t, 1),
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}}
        print(hook, json.dumps(quality[hook]), flush=True)
    return quality


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--weight", type=float, default=20.0, help="weight of the modularity loss")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=4, help="modules the loss clusters the channels into")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-null", type=int, default=200, help="null graphs for the z-scores")
    parser.add_argument("--sae-tokens", type=int, default=1_200_000)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=toy.MODULAR_DIR)
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="resumable training state (an interrupted run continues from here)")
    parser.add_argument("--no-saes", action="store_true", help="skip the SAEs (a quick look at the model)")
    parser.add_argument("--only-saes", action="store_true", help="(re)train the SAEs of the model already in --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.only_saes:
        model = toy.load_model(args.out)
        facts = toy.info(args.out)
        facts["saes"] = train_saes(model, args)
        toy.save_model(model, args.out, info=facts)
        print("wrote", args.out)
        return 0

    start = time.perf_counter()
    model = toy.load_model()
    loss = ModularityLoss(n_modules=args.modules, refresh_every=50, seed=args.seed)
    result = train_modular(model, None, args.weight, args.steps, loss=loss, eval_every=max(25, args.steps // 4),
                           lr=args.lr, warmup=20, seed=args.seed, checkpoint_dir=args.checkpoint_dir)
    model = result.model.eval()
    modules = loss.modules()
    train_minutes = (time.perf_counter() - start) / 60
    print(f"trained {args.steps} steps in {train_minutes:.1f} min; loss modules {[sorted(m) for m in modules]}; "
          f"cross-module fraction {loss.cross_fraction(model):.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:   # check the model as it will be loaded
        toy.save_model(model, tmp)
        model = toy.load_model(tmp)
    accuracy = toy.evaluate(model, toy.eval_tasks(n=2048, seed=50_000))
    start = time.perf_counter()
    facts = measure(model, modules, n_null=args.n_null, threads=args.threads)
    facts.update({"base": "tl_modular.toy.load_model()", "weight": args.weight, "steps": args.steps,
                  "n_modules": args.modules, "lr": args.lr, "seed": args.seed,
                  "train_minutes": round(train_minutes, 1),
                  "cross_fraction": round(loss.cross_fraction(model), 4),
                  "accuracy": {k: round(v, 4) for k, v in accuracy.items()}})
    print(json.dumps(facts), f"(checks {time.perf_counter() - start:.0f} s)", flush=True)

    big = [m for m in modules if len(m) >= 2]
    q = facts["loss_modules_Q"]
    problems = [f"{t} accuracy {a:.3f} < 0.95" for t, a in accuracy.items() if a < 0.95]
    if len(big) < 3:
        problems.append(f"{len(big)} loss modules of >= 2 channels, need 3")
    if not (q["z"] >= 2 and q["p"] <= 0.05):
        problems.append(f"loss modules' z {q['z']:.2f} (p {q['p']:.3f}): need z >= 2 and p <= 0.05")
    if len(facts["graph_modules"]) < 3:
        problems.append(f"the graph's own rule finds {len(facts['graph_modules'])} modules, need 3")
    if problems:
        print("NOT written:", "; ".join(problems), file=sys.stderr)
        return 1

    if not args.no_saes:
        facts["saes"] = train_saes(model, args)
    toy.save_model(model, args.out, info=facts)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
