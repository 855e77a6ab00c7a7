"""Write tests/data/artifacts_0_1: a tiny model's artifacts as tl_modular 0.1.0.dev0 saved them, before
the one save convention (``compression.json`` then had its own header: ``kind`` / ``schema_version``;
``Labels.save`` was given a file). tests/test_artifacts.py loads them, so that files written by that
release keep loading. Run from the repository root with that release checked out:

    python tests/data/make_artifacts.py
"""

from pathlib import Path

import torch

import tl_modular as tlm
from tl_modular import labeling
from tl_modular.testing import tiny_model

OUT = Path(__file__).parent / "artifacts_0_1"


def main() -> None:
    model = tiny_model("gpt2", seed=0)
    tokens = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, tokens, budget=40, progress=False)
    comp.save(OUT / "compression")
    graph = tlm.build_graph(comp, model=model, tokens=tokens, progress=False)
    graph.save(OUT / "graph")
    circuits = graph.circuits(model, {"text": tokens[:8]}, n_boot=5, n_random=1, sizes=[5, 20], progress=False)
    circuits.save(OUT / "graph")
    other = tlm.compress(tiny_model("gpt2", seed=1), tokens, budget=40, progress=False)
    tlm.diff(comp, other).save(OUT / "diff")
    units = labeling.neurons(model, 0, indices=[0, 1])
    labels = labeling.label(units, model, tokens, n_boot=5, progress=False)
    labels.save(OUT / "labels.json")


if __name__ == "__main__":
    main()
