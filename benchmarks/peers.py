"""tl_modular's circuits next to auto-circuit's edge-level methods, on the bundled model's four tasks.

Every method sees the same prompts (``--prompts`` per task, seed 5), the same corrupted prompts
as the baseline, and the same metric (the task's logit difference, averaged over its scored
positions and prompts). Faithfulness of a circuit = ``(m_circuit - m_empty) / (m_clean -
m_empty)``, where everything outside the circuit carries the corrupted run's activations.

- **routes** — ``graph.circuits`` (tl_modular): the 110 routes writer → reader port of the
  bundled model's channel graph (embed, 8 heads, 2 MLPs → each head's q/k/v, each MLP, the
  unembedding), corrupted baseline, target 0.9.
- **features** — ``tlm.attribution_graph`` per prompt over the same compression's write
  directions, pruned by logit influence at a sweep of edge thresholds, verified by intervention
  with the corrupted baseline (``tlm.attribution.faithfulness``); its edges are per prompt and
  position (feature → feature), so they are counted as a fraction of each graph's edges.
- **EAP, ACDC, SP** — auto-circuit 1.0.1's edge attribution patching, ACDC (τ = 10⁻⁶…10⁻³, KL
  target, its own first batch only) and subnetwork edge probing (hard-concrete masks, KL target,
  200 epochs), on auto-circuit's factorised graph of the same model: its edges are *the same 110*
  (Resid Start = embed, ``A{l}.{h}.{Q,K,V}`` = head ports, ``MLP l``, Resid End = unembed). Each
  method's scores order the edges; auto-circuit's ``run_circuits`` patches every top-k circuit,
  k = 0…110, and the smallest k with faithfulness ≥ 0.9 is reported. Patching is
  ``PatchType.TREE_PATCH`` with resample ablation: the clean run with every edge *outside* the
  circuit carrying the corrupted run's source output — the circuit definition of ACDC and of
  ``graph.circuits``. (auto-circuit's default ``EDGE_PATCH`` runs the corrupted prompt and lets each
  circuit edge carry its source's *clean-run* output whatever feeds that source, so a handful of
  edges into the logits already restores most of the metric: on addition (8 prompts) EAP's top 3
  edges gave 0.93 that way; not a circuit in the sense compared here.)
- **check** — tl_modular's route circuit evaluated by auto-circuit's own patching code: an
  independent check of the faithfulness ``graph.circuits`` reports.

auto-circuit is not a dependency of tl_modular; install it in its own environment::

    python3 -m venv /work/peers-venv && /work/peers-venv/bin/pip install torch==2.13.0
    /work/peers-venv/bin/pip install -c constraints.txt -e . attrs ordered-set plotly blobfile vscode-tqdm
    /work/peers-venv/bin/pip install auto-circuit==1.0.1 --no-deps
    OMP_NUM_THREADS=1 /work/peers-venv/bin/python benchmarks/peers.py          # ~5 min on 1 thread

auto-circuit 1.0.1 was written for TransformerLens 1.x: this script gives it TransformerLens 3's
key-value cache class under the two names it imports (``transformer_lens.HookedTransformerKeyValueCache``
and ``transformer_lens.past_key_value_caching``; only used as a type and an unused default here)
empty stand-ins for ``tracr`` (imported by its tracr task module, which is not used), and binds
``torch.optim.adam`` (its subnetwork probing calls ``torch.optim.adam.Adam``), so no algorithm code
of auto-circuit is changed.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import types
from typing import Any


def _shim_auto_circuit() -> None:
    import importlib

    import torch
    import transformer_lens

    # auto-circuit's subnetwork probing calls torch.optim.adam.Adam; torch 2.13 no longer binds the
    # submodule as an attribute of torch.optim (it is still there)
    torch.optim.adam = importlib.import_module("torch.optim.adam")
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    transformer_lens.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    old = types.ModuleType("transformer_lens.past_key_value_caching")
    old.HookedTransformerKeyValueCache = TransformerLensKeyValueCache
    sys.modules.setdefault(old.__name__, old)

    class _Stub(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("tracr", "tracr.compiler", "tracr.compiler.compiling", "tracr.compiler.assemble",
                 "tracr.compiler.lib", "tracr.rasp", "tracr.rasp.rasp"):
        sys.modules.setdefault(name, _Stub(name))


def _edge_name(writer: str, port: str) -> tuple[str, str]:
    """tl_modular route (writer, port) -> auto-circuit edge (source name, destination name)."""
    def node(ch: str) -> str:
        if ch == "embed":
            return "Resid Start"
        if ch == "unembed":
            return "Resid End"
        layer, rest = ch.split(".", 1)
        if rest == "MLP":
            return f"MLP {layer[1:]}"
        head, *letter = rest.split(":")
        return f"A{layer[1:]}.{head[1:]}" + (f".{letter[0].upper()}" if letter else "")
    return node(writer), node(port)


def _metric(task: Any, logits: Any) -> float:
    """The task's logit difference, mean over prompts and scored positions (logits ``[b, k, vocab]``)."""
    a, w = task.answers[..., None], task.wrong_answers[..., None]
    return float((logits.gather(-1, a) - logits.gather(-1, w)).mean())


def _curve(run_circuits: Any, patchable: Any, loader: Any, task: Any, n_edges: int, clean: float, empty: float,
           scores: Any) -> dict[int, float]:
    """Faithfulness of every top-k circuit of ``scores`` by auto-circuit's own patching (tree patching,
    resample ablation from the corrupted prompts)."""
    from auto_circuit.types import AblationType, PatchType

    outs = run_circuits(patchable, loader, list(range(n_edges + 1)), scores, patch_type=PatchType.TREE_PATCH,
                        ablation_type=AblationType.RESAMPLE)
    m = {k: _metric(task, next(iter(v.values()))) for k, v in outs.items()}
    return {k: (v - empty) / (clean - empty) for k, v in sorted(m.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tasks", default="modular_addition,brackets,sorting,induction")
    parser.add_argument("--sp-epochs", type=int, default=200)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    _shim_auto_circuit()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune import run_circuits
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores
    from auto_circuit.prune_algos.edge_attribution_patching import edge_attribution_patching_prune_scores
    from auto_circuit.prune_algos.subnetwork_probing import subnetwork_probing_prune_scores
    from auto_circuit.utils.graph_utils import patchable_model

    import tl_modular as tlm
    from tl_modular import toy
    from tl_modular.attribution import faithfulness, prune

    model = toy.load_model()
    start = time.perf_counter()
    tokens, mask, scored = toy.mixed_tokens(n_per_task=32, seed=2, scored=True)
    comp = tlm.compress(model, tokens, attention_mask=mask, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=scored,
                            metric="logit", progress=False)
    setup = time.perf_counter() - start
    routes = sorted(graph.routes("static"))

    ac_model = toy.load_model()
    ac_model.set_use_attn_result(True)
    ac_model.set_use_split_qkv_input(True)
    ac_model.set_use_hook_mlp_in(True)
    patchable = patchable_model(ac_model, factorized=True, slice_output=None, seq_len=None, separate_qkv=True,
                                device=torch.device("cpu"))
    by_name = {(e.src.name, e.dest.name): e for e in patchable.edges}
    assert len(by_name) == len(routes) and {_edge_name(*r) for r in routes} == set(by_name), \
        "auto-circuit's factorised graph and tl_modular's routes should be the same 110 edges"
    print(f"setup (compress + build_graph) {setup:.1f} s; {len(routes)} routes = {len(by_name)} auto-circuit edges",
          flush=True)

    rows = []
    for name in args.tasks.split(","):
        task = toy.GENERATORS[name](args.prompts, seed=5)
        positions = task.positions[0].tolist()
        assert (task.positions == task.positions[0]).all(), "every prompt of a toy task scores the same positions"
        row: dict[str, Any] = {"task": name}

        # --- tl_modular: route circuits ----------------------------------------------------------
        t0 = time.perf_counter()
        circuit = graph.circuits(model, {name: task}, n_boot=20, n_random=1, batch_size=64, progress=False)[name]
        row["routes"] = (circuit.size, circuit.faithfulness, time.perf_counter() - t0)

        # --- tl_modular: feature graphs --------------------------------------------------------
        t0 = time.perf_counter()
        graphs = tlm.attribution_graph(model, task, units=comp)
        built = time.perf_counter() - t0
        found = None
        for threshold in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
            kept = [prune(g, node_threshold=1.0, edge_threshold=threshold) for g in graphs]
            f = faithfulness(model, task, comp, kept, baseline="corrupted")["faithfulness"]
            found = (sum(k.n_edges for k in kept) / len(kept), sum(k.edge_fraction for k in kept) / len(kept), f)
            if f >= 0.9:
                break
        row["features"] = (*found, time.perf_counter() - t0, built / len(graphs),
                           sum(g.adjacency._nnz() for g in graphs) / len(graphs))

        # --- auto-circuit ------------------------------------------------------------------------
        answers = [a[:, None] for a in task.answers]
        wrong = [w[:, None] for w in task.wrong_answers]
        dataset = PromptDataset(task.clean, task.corrupted, answers, wrong)
        loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(task), shuffle=False)
        patchable.out_slice = (slice(None), positions)      # the task's scored positions: logits [b, k, vocab]

        with torch.no_grad():     # no edge patched: the clean run; every edge patched: the corrupted run
            clean, empty = (_metric(task, model(x)[:, positions]) for x in (task.clean, task.corrupted))
        curve = functools.partial(_curve, run_circuits, patchable, loader, task, len(routes), clean, empty)
        for label, algo in (
                ("EAP", functools.partial(edge_attribution_patching_prune_scores, answer_diff=True)),
                ("ACDC", functools.partial(acdc_prune_scores, tao_exps=list(range(-6, -2)), tao_bases=[1])),
                ("SP", functools.partial(subnetwork_probing_prune_scores, learning_rate=0.1, epochs=args.sp_epochs,
                                         regularize_lambda=0.5, mask_fn="hard_concrete", show_train_graph=False))):
            t0 = time.perf_counter()
            scores = algo(patchable, loader, None)
            spent = time.perf_counter() - t0
            c = curve(scores)
            k = min((k for k, f in c.items() if f >= 0.9), default=max(c))
            row[label] = (k, c[k], spent)

        # --- independent check: tl_modular's route circuit through auto-circuit's patching -------
        chosen = {_edge_name(*r) for r in circuit.routes}
        scores = patchable.new_prune_scores()
        for key in chosen:
            e = by_name[key]
            scores[e.dest.module_name][e.patch_idx] = 1.0
        row["check"] = curve(scores)[len(chosen)]
        rows.append(row)
        print(row, flush=True)

    print(f"\n{'task':17} {'routes (tl_modular)':>22} {'auto-circuit check':>18} {'EAP':>16} {'ACDC':>16} {'SP':>16} "
          f"{'features (tl_modular)':>34}")
    for r in rows:
        k, f, s = r["routes"]
        cells = [f"{k:3d} {f:.2f} {s:5.1f}s", f"{r['check']:.3f}"]
        cells += [f"{r[m][0]:3d} {r[m][1]:.2f} {r[m][2]:5.1f}s" for m in ("EAP", "ACDC", "SP")]
        n, frac, ff, fs, per, total = r["features"]
        cells.append(f"{n:8.0f} ({100 * frac:.2f}% of {total:.0f}) {ff:.2f} {fs:5.1f}s")
        print(f"{r['task']:17} {cells[0]:>22} {cells[1]:>18} {cells[2]:>16} {cells[3]:>16} {cells[4]:>16} "
              f"{cells[5]:>34}")
    print("cells: edges needed for faithfulness >= 0.9, the faithfulness there, the method's time (1 thread); "
          "features: mean kept edges per prompt (share of its graph's edges)")


if __name__ == "__main__":
    main()
