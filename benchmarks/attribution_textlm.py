"""Pruned attribution builds on the bundled text model: edges held, peak memory, and the report stage.

Per category of the report (IOI, greater-than, docstring, induction), the first prompt's graph over
a finished report's compression, built at ``--min-influence`` in a process of its own (so each
peak RSS is its own): edges held by the build (``info["edges_built"]``), the graph's edges, the
features folded, seconds, the peak RSS over the loaded model and whether it fits the stage's
``max_edges`` at ``AnalyzeConfig.attribution_memory`` (1 GiB). ``--stage``: the report's
feature-circuit stage alone (4 prompts per category, default settings): the ``min_influence`` each
category settles at, its faithfulness and random controls.

    tl-modular analyze --model textlm --out /tmp/textlm               # the compression (~20 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attribution_textlm.py /tmp/textlm/compression
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attribution_textlm.py /tmp/textlm/compression --stage

For a before/after pair, run it a second time with ``PYTHONPATH`` at a checkout of the older code.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CATEGORIES = ("ioi", "greater_than", "docstring", "induction")


def _inputs(compression: str) -> tuple:
    from tl_modular import report, textlm
    from tl_modular.compression import Compression

    model = textlm.load_model()
    comp = Compression.load(compression, model)
    # the categories alone: a two-token stand-in for the report's text
    inputs = report.textlm_inputs(model=model, tokens=torch.zeros(1, 2, dtype=torch.long))
    return model, comp, inputs


def one_build(compression: str, name: str, min_influence: float) -> dict:
    """The first prompt of ``name`` built at ``min_influence`` (call in a fresh process)."""
    from tl_modular.attribution.build import EDGE_BYTES, attribution_graph, graph_size
    from tl_modular.report.pipeline import AnalyzeConfig

    model, comp, inputs = _inputs(compression)
    task = inputs.categories[name]
    n_attribution = AnalyzeConfig().n_attribution
    n_targets = max(len(set(torch.as_tensor(p).reshape(-1).tolist())) for p in task.positions[:n_attribution])
    size = graph_size(model, comp, task.clean.shape[1], n_targets)
    max_edges = (int(AnalyzeConfig().attribution_memory * 2**30) - size.node_bytes) // EDGE_BYTES
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    g = attribution_graph(model, task[:1], units=comp, min_influence=min_influence)[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"category": name, "min_influence": min_influence, "edges_held": g.info["edges_built"],
            "graph_edges": g.adjacency._nnz(), "folded": g.info["dropped_features"], "seconds": round(seconds, 1),
            "peak_rss_over_model_MB": round((peak - before) / 1e3), "max_edges": max_edges,
            "fits": g.info["edges_built"] <= max_edges, "completeness": g.completeness()}


def stage(compression: str) -> dict:
    """The report's feature-circuit stage alone, default settings."""
    from tl_modular.report.pipeline import AnalyzeConfig, _attribution_settings, _attribution_stage

    model, comp, inputs = _inputs(compression)
    settings = _attribution_settings(AnalyzeConfig())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        data = _attribution_stage(inputs, comp, settings, Path(d))()
    out = {"seconds": round(time.perf_counter() - start), "peak_rss_MB":
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1000}
    for name, c in data["categories"].items():
        out[name] = {k: c.get(k) for k in ("skipped", "min_influence", "faithfulness", "random", "edges",
                                           "edges_kept", "completeness")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compression", help="a report's compression folder (tl-modular analyze --model textlm)")
    ap.add_argument("--min-influence", type=float, default=1e-4)
    ap.add_argument("--stage", action="store_true", help="run the report's feature-circuit stage alone")
    ap.add_argument("--one", help=argparse.SUPPRESS)         # a single build, in the child process
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.stage:
        print(json.dumps(stage(args.compression), indent=1))
        return
    if args.one:
        print(json.dumps(one_build(args.compression, args.one, args.min_influence)))
        return
    for name in CATEGORIES:
        res = subprocess.run([sys.executable, __file__, args.compression, "--one", name, "--min-influence",
                              str(args.min_influence)], capture_output=True, text=True, check=True)
        print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
