"""The report's static pictures for papers, drawn with matplotlib into ``figures/`` of the report directory (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_modular._io import _atomic, write_json

if TYPE_CHECKING:
    from tl_modular.circuits import CircuitSet
    from tl_modular.graph import ChannelGraph


def draw_all(out: Path, graph: ChannelGraph, modules: list, summary: dict[str, Any],
             circuits: CircuitSet | None) -> dict[str, str]:
    """Draw every figure the summary has data for into ``out/figures/``; returns ``{figure: path
    relative to out}`` (also written to ``out/figures.json``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figures: dict[str, str] = {}
    (out / "figures").mkdir(parents=True, exist_ok=True)
    graph.plot(out / "figures" / "graph.png", modules=modules)
    plt.close("all")
    figures["graph"] = "figures/graph.png"

    rows = summary.get("rank_fidelity") or []
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        dims = [r["dimensions"] for r in rows]
        ax.plot(dims, [r["loss_recovered"] for r in rows], "o-", label="loss recovered")
        ax.plot(dims, [r["kl"] for r in rows], "s--", label="KL (nats)")
        ax.set_xlabel(f"dimensions kept (of {rows[0]['max_dimensions']})")
        ax.set_title("rank–fidelity")
        ax.legend()
        fig.tight_layout()
        _savefig(fig, out / "figures" / "rank_fidelity.png")
        plt.close(fig)
        figures["rank_fidelity"] = "figures/rank_fidelity.png"

    if circuits is not None and len(circuits):
        circuits.plot(graph, out / "figures" / "circuits.png")
        plt.close("all")
        figures["circuits"] = "figures/circuits.png"

    poly = summary.get("polysemanticity")
    if poly and poly["rows"]:
        import numpy as np

        scores = [r["score"] for r in poly["rows"] if not np.isnan(r["score"])]
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.barh(range(len(scores[:15]))[::-1], scores[:15])
        ax.set_yticks(range(len(scores[:15]))[::-1], [r["unit"] for r in poly["rows"][:15]], fontsize=7)
        ax.set_xlabel("effective number of SAE features")
        ax.set_title("most polysemantic units")
        fig.tight_layout()
        _savefig(fig, out / "figures" / "polysemanticity.png")
        plt.close(fig)
        figures["polysemanticity"] = "figures/polysemanticity.png"
    write_json(out / "figures.json", figures)
    return figures


def _savefig(fig: Any, path: Path) -> None:
    """Atomically, as every file of the report (a re-run's staging folder hard-links the old files)."""
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
