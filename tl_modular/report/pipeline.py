"""The whole flow on one model and one dataset: every stage's result written to a report directory.

Stages (each saved as it finishes, and reused on a re-run with the same model, data and
settings — the key is the model's weight fingerprint, a hash of the tokens and the settings):
segmentation → compression (``compression/``) → rank–fidelity curve → channel graph
(``graph.json``) → modules and null model → circuits per category (``circuits.json``) →
polysemanticity with SAEs → feature circuits per category (``attribution.json``,
``attribution_set.json``) → labels (``labels.json``) → ``summary.json`` and ``report.html``.

The directory is replaced as a unit: the stages write into a sibling staging folder
(``.NAME.partial``, seeded with hard links of a finished report with the same key), which replaces
``out`` only when the report is complete (an atomic exchange of the two folders where the system
has one). A run killed at any moment leaves the old report whole; the next run resumes from the
staging folder. What the report does not write itself (the labeler's ``llm_cache``, files of your
own) is carried over into the new report.

Under ``torch.distributed`` (``torchrun ... -m tl_modular analyze``) every rank runs every stage,
whose passes over tokens are data parallel; rank 0 alone decides which stages are reused and
writes the report (the other ranks write into a private temporary folder, removed at the end).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from tl_modular import _dist
from tl_modular._io import ArtifactError, read_json, write_json
from tl_modular._models import fingerprint
from tl_modular._names import module_name, parse
from tl_modular._redact import redact_obj, redact_url

SUMMARY_VERSION = 1
# What a report writes (replaced as a unit); any other entry of the report directory is carried over.
_REPORT_ENTRIES = frozenset({"compression", "graph.json", "circuits.json", "modules.json", "rank_fidelity.json",
                             "polysemanticity.json", "attribution.json", "attribution_set.json", "labels.json",
                             "labels_summary.json", "figures", "figures.json", "manifest.json", "summary.json",
                             "report.html"})
# Settings of the feature-circuit stage alone: outside the cache key, so switching it on or off (or
# changing its prompt count) reuses every other stage; the stage checks them itself on reuse.
_OWN_KEY = ("attribution", "n_attribution", "attribution_memory")
# 2: pruned builds (min_influence) within a memory budget, one prompt at a time; error nodes frozen
# 3: a pruned build holds only its graph's edges (folds as it goes): fewer categories retry at 1e-3
ATTRIBUTION_VERSION = 3


@dataclass(kw_only=True)
class AnalyzeConfig:
    """Settings of :func:`analyze` (all but ``attribution``, ``n_attribution`` and ``attribution_memory``
    part of the cache key).

    Attributes:
        metric: Route strengths from the next-token ``"loss"`` or the correct token's ``"logit"``
            (models so confident that loss gradients vanish, like the bundled one).
        batch_size: Sequences per forward pass.
        n_null: Null-model samples for the modularity z-scores.
        budgets: Number of points on the rank–fidelity curve.
        n_boot, n_random: Bootstrap samples and random circuits per category.
        max_score_tokens: Tokens for the polysemanticity scores.
        n_label_units: How many units (modules, then the most polysemantic neurons) get labels.
        attribution: Whether to build feature circuits per category (on by default;
            ``--no-attribution`` turns it off); the other stages are reused either way.
        n_attribution: Prompts per category for the feature circuits (one attribution graph each).
        attribution_memory: GiB one attribution graph may hold (its size is estimated before the
            build, and a build stops at it): over it the stage prunes harder while building
            (a larger ``min_influence``), and skips the category with the reason if that is not
            enough.
    """

    metric: Literal["loss", "logit"] = "loss"
    batch_size: int = 32
    n_null: int = 50
    budgets: int = 6
    n_boot: int = 100
    n_random: int = 5
    max_score_tokens: int = 8192
    n_label_units: int = 24
    attribution: bool = True
    n_attribution: int = 4
    attribution_memory: float = 1.0

    def __post_init__(self) -> None:
        if self.metric not in ("loss", "logit"):
            raise ValueError(f"metric must be 'loss' or 'logit', got {self.metric!r}")
        for name in ("batch_size", "budgets", "n_attribution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.attribution_memory > 0:
            raise ValueError(f"attribution_memory must be > 0 GiB, got {self.attribution_memory!r}")


@dataclass
class Inputs:
    """What to analyze: a model, its data, and optional categories, SAEs and labeler."""

    model: Any
    tokens: torch.Tensor
    name: str
    attention_mask: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    categories: Mapping[str, Any] = field(default_factory=dict)
    saes: Any = None
    labeler: Any = None
    simulator: Any = None
    decode: Callable[[list[int]], str] | None = None
    data: Mapping[str, Any] | None = None   # where the tokens came from: read/used/dropped (recorded)
    # A partition to test besides the graph's own modules (e.g. the modules a modularity loss was
    # trained with): scored as a fixed partition against the same null, {"modules": [[...]], "source": str}
    modules: Mapping[str, Any] | None = None


def _digest(*tensors: torch.Tensor | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
            h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()


def _describe(labeler: Any) -> str | None:
    """What identifies a labeler's answers (its class, and the LLM and server it asks; never a key)."""
    if labeler is None:
        return None
    cfg = getattr(labeler, "config", None)
    url = redact_url(getattr(cfg, "base_url", None), getattr(cfg, "api_key", None))
    return type(labeler).__name__ + (f":{cfg.model}@{url}" if hasattr(cfg, "model") else "")


def cache_key(inputs: Inputs, config: AnalyzeConfig) -> str:
    parts = {"model": fingerprint(inputs.model), "tokens": _digest(inputs.tokens, inputs.attention_mask,
                                                                     inputs.loss_mask),
             "categories": sorted(inputs.categories),
             "config": {k: v for k, v in asdict(config).items() if k not in _OWN_KEY},
             # the SAEs by their weights, not only their hooks: retrained SAEs must not reuse old scores
             "saes": {h: _digest(getattr(inputs.saes[h], "W_dec", None)) for h in sorted(inputs.saes)}
             if inputs.saes is not None else None,
             "labeler": _describe(inputs.labeler), "simulator": _describe(inputs.simulator),
             "modules": [sorted(m) for m in inputs.modules["modules"]] if inputs.modules else None}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class _Stages:
    """Runs stages, timing each and reusing what a previous run with the same key left.

    ``out`` is where earlier stages are read from, ``dest`` where this process writes (``out`` on
    rank 0; a private folder on the other ranks of a process group, which follow rank 0's reuse)."""

    def __init__(self, out: Path, key: str, reuse: bool, progress: bool, data: Mapping[str, Any] | None = None,
                 dest: Path | None = None):
        self.out, self.key, self.progress, self.data = out, key, progress, dict(data or {})
        self.dest = dest or out
        manifest = out / "manifest.json"
        try:
            old = read_json(manifest) if manifest.exists() and _dist.is_main() else {}
        except ArtifactError as e:               # e.g. a foreign or damaged file: every stage runs again
            self._say(f"{e}; every stage runs again")
            old = {}
        old = old if isinstance(old, dict) else {}
        stages = old.get("stages") if isinstance(old.get("stages"), dict) else {}
        # every rank reuses what rank 0 reuses (a stage computed by some ranks only would wait forever)
        self.done: dict[str, Any] = _dist.broadcast_object(stages if reuse and old.get("key") == key else {})
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any], load: Callable[[], Any] | None = None) -> Any:
        _dist.exit_if_asked(name)            # tests only: a rank that dies here (TL_MODULAR_TEST_RANK_EXIT)
        if name in self.done and load is not None:
            value, error = None, None
            try:
                value = load()
            except (OSError, ValueError, KeyError) as e:   # a missing, damaged or stale artifact: compute it again
                error = e
            # reused only when every rank could load it
            if _dist.all_reduce({"failed": float(error is not None)}, "max")["failed"] == 0:
                self.times[name] = 0.0   # marks a reused stage
                self._say(f"{name}: reused")
                return value
            if isinstance(error, ArtifactError):
                self._say(f"{name}: {error}; computing it again")
        start = time.perf_counter()
        self._say(f"{name} ...")
        value = fn()
        self.times[name] = round(time.perf_counter() - start, 2)
        self.done[name] = {"seconds": self.times[name]}
        self._write_manifest()
        return value

    def forget(self, name: str, files: tuple[str, ...]) -> None:
        """Drop stage ``name`` and its ``files`` from the report (a stage switched off)."""
        for f in files:
            (self.dest / f).unlink(missing_ok=True)
        if self.done.pop(name, None) is not None:
            self._write_manifest()

    def _write_manifest(self) -> None:
        write_json(self.dest / "manifest.json", {"key": self.key, "data": self.data, "stages": self.done})

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"[tl-modular] {text}", flush=True)


def analyze(inputs: Inputs, out: str | os.PathLike, config: AnalyzeConfig | None = None, *, reuse: bool = True,
            progress: bool = True) -> Path:
    """Run the whole flow and write the report directory ``out`` (see the module docs).

    >>> tlm.report.analyze(tlm.report.bundled_inputs(), "report")        # doctest: +SKIP
    PosixPath('report/report.html')
    """
    cfg = config or AnalyzeConfig()
    final, key = Path(out), cache_key(inputs, cfg)
    # every stage writes into the staging folder, which replaces final at the end (rank 0 chooses it)
    staging = Path(_dist.on_main(lambda: _staging_for(final, key, reuse, progress)))
    if not _dist.is_main():      # the other ranks of a process group: no file in the report, no output
        dest = Path(tempfile.mkdtemp(prefix=f"tl-modular-rank{_dist.rank()}-"))
        try:
            page = _analyze(inputs, staging, dest, cfg, reuse=reuse, progress=False)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return final / page.name
    page = _analyze(inputs, staging, staging, cfg, reuse=reuse, progress=progress)
    if staging != final:
        _commit(staging, final)
    return final / page.name


def _analyze(inputs: Inputs, out: Path, dest: Path, cfg: AnalyzeConfig, *, reuse: bool, progress: bool) -> Path:
    """:func:`analyze` reading earlier stages from ``out`` and writing into ``dest``."""
    import tl_modular as tlm
    from tl_modular.circuits import CircuitSet
    from tl_modular.compression import Compression
    from tl_modular.compression.fidelity import rank_fidelity_curve
    from tl_modular.graph import ChannelGraph
    from tl_modular.report.html import render

    model, tokens, mask = inputs.model, inputs.tokens, inputs.attention_mask
    stages = _Stages(out, cache_key(inputs, cfg), reuse, progress, inputs.data, dest)
    summary: dict[str, Any] = {"schema": "tl_modular.Report", "version": SUMMARY_VERSION, "model": inputs.name,
                               "model_fingerprint": fingerprint(model), "n_sequences": int(tokens.shape[0]),
                               "n_tokens": int(tokens.numel() if mask is None else mask.sum()),
                               "data": dict(inputs.data or {}), "config": asdict(cfg)}
    channels = tlm.segment(model)
    summary["channels"] = {"n": len(channels), "kinds": _count(c.kind for c in channels)}

    def compress() -> Any:
        comp = tlm.compress(model, tokens, attention_mask=mask, batch_size=min(cfg.batch_size, 16), progress=progress)
        comp.save(dest / "compression")
        return comp
    comp = stages.run("compression", compress, lambda: Compression.load(out / "compression", model))
    summary["compression"] = {"dimensions": comp.total_rank, "max_dimensions": comp.max_total_rank,
                              "per_channel": {n: {k: s.rank for k, s in c.sides.items()}
                                              for n, c in comp.channels.items()}}

    def curve() -> Any:
        top = comp.total_rank
        budgets = sorted({max(1, int(top * f)) for f in np.linspace(0.1, 1.0, cfg.budgets)})
        rows = rank_fidelity_curve(model, comp, tokens[: 4 * cfg.batch_size], budgets,
                                   attention_mask=None if mask is None else mask[: 4 * cfg.batch_size],
                                   batch_size=cfg.batch_size, progress=progress)
        write_json(dest / "rank_fidelity.json", rows)
        return rows
    summary["rank_fidelity"] = stages.run("rank_fidelity", curve, lambda: read_json(out / "rank_fidelity.json"))

    def graph_stage() -> Any:
        g = tlm.build_graph(comp, model=model, tokens=tokens, attention_mask=mask, loss_mask=inputs.loss_mask,
                            metric=cfg.metric, batch_size=min(cfg.batch_size, 16), progress=progress)
        g.save(dest)
        return g
    graph = stages.run("graph", graph_stage, lambda: ChannelGraph.load(out, compression=comp))

    def modules_stage() -> Any:
        modules = graph.modules()
        scores = graph.modularity(n_null=cfg.n_null, progress=progress) if cfg.n_null > 1 else {}
        result = {"modules": [sorted(m) for m in modules], "modularity": scores}
        if inputs.modules:   # a known partition, scored as fixed on the graph and on every null graph
            given = [sorted(m) for m in inputs.modules["modules"]]
            result["given"] = {"modules": given, "source": str(inputs.modules.get("source", "given")),
                               "modularity": graph.modularity(n_null=cfg.n_null, modules=given, progress=False)
                               if cfg.n_null > 1 else {}}
        write_json(dest / "modules.json", result)
        return result
    summary["modules"] = stages.run("modules", modules_stage, lambda: read_json(out / "modules.json"))
    modules = [frozenset(m) for m in summary["modules"]["modules"]]

    circuits = None
    if inputs.categories:
        def circuits_stage() -> Any:
            cs = graph.circuits(model, dict(inputs.categories), n_boot=cfg.n_boot, n_random=cfg.n_random,
                                batch_size=cfg.batch_size, progress=progress)
            cs.save(dest)
            return cs
        circuits = stages.run("circuits", circuits_stage, lambda: CircuitSet.load(out))
        names, sim = circuits.similarity()
        summary["circuits"] = {
            "n_routes": len(graph.routes()), "shared": sorted(map(list, circuits.shared())),
            "similarity": {"names": names, "jaccard": np.asarray(sim).round(3).tolist()},
            "categories": {n: {"size": c.size, "faithfulness": c.faithfulness,
                               "faithfulness_interval": list(c.faithfulness_interval),
                               "completeness": c.completeness, "routes": [list(r) for r in c.routes[:10]]}
                           for n, c in circuits.items()}}

    if inputs.saes is not None:
        def poly_stage() -> Any:
            table = tlm.sae.score_model(model, inputs.saes, tokens, comp=comp, attention_mask=mask,
                                        max_tokens=cfg.max_score_tokens, batch_size=cfg.batch_size)
            rows = table.ranked(50)
            write_json(dest / "polysemanticity.json", {"n_tokens": table.n_tokens, "rows": rows})
            return {"n_tokens": table.n_tokens, "rows": rows}
        summary["polysemanticity"] = stages.run("polysemanticity", poly_stage,
                                                lambda: read_json(out / "polysemanticity.json"))

    _attribution(inputs, stages, comp, summary, out, dest, cfg)

    label_stage = _label_stage(inputs, graph, modules, summary, dest, cfg, circuits, comp)
    summary["labels"] = stages.run("labels", label_stage, lambda: _complete_labels(out / "labels_summary.json"))

    def figures() -> dict[str, str]:
        from tl_modular.report.figures import draw_all
        return draw_all(dest, graph, modules, summary, circuits)
    summary["figures"] = stages.run("figures", figures, lambda: read_json(out / "figures.json"))
    summary["timings"] = {k: v["seconds"] for k, v in stages.done.items()}   # as first computed
    summary["reused"] = sorted(k for k, v in stages.times.items() if v == 0.0 and k in stages.done)
    write_json(dest / "summary.json", summary)
    return render(summary, dest)


# --- the report directory as a unit -------------------------------------------------------------

def staging_dir(out: str | os.PathLike) -> Path:
    """The folder where :func:`analyze` builds the report that replaces ``out`` (the stages of an
    interrupted run are saved there; the same call again resumes from it)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.partial"


def _retired_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _manifest_key(directory: Path) -> str | None:
    try:
        data = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("key") if isinstance(data, dict) else None


def _link_or_copy(src: str, dst: str) -> None:
    # every report file is replaced atomically (a new inode), so a hard link never sees a later write
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _staging_for(final: Path, key: str, reuse: bool, progress: bool) -> Path:
    """The staging folder of ``final``: the one an interrupted run with this key left, else a new one
    seeded with ``final``'s report files when they have this key; ``final`` itself where no sibling
    folder can be made (the current directory, a mount point, a parent that is not writable)."""
    say = (lambda text: print(f"[tl-modular] {text}", flush=True)) if progress else (lambda text: None)
    final.mkdir(parents=True, exist_ok=True)
    real = final.resolve()
    cwd = Path.cwd().resolve()
    if real.parent == real or os.path.ismount(real) or cwd == real or real in cwd.parents:
        say(f"{final} is written in place (it cannot be replaced as a unit: it is the current folder or a mount)")
        return final
    _recover(real)
    staging = staging_dir(real)
    if staging.exists() and not (reuse and _manifest_key(staging) == key):
        say(f"an unfinished report of other inputs or settings in {staging} is discarded")
        _discard(staging, real)
    if staging.exists():
        say(f"resuming the unfinished report in {staging}")
        return staging
    try:
        staging.mkdir()
    except OSError as e:
        say(f"{final} is written in place ({staging} cannot be made: {e.strerror or e})")
        return final
    if reuse and _manifest_key(real) == key:
        for entry in sorted(_REPORT_ENTRIES):
            src = real / entry
            if src.is_dir() and not src.is_symlink():
                shutil.copytree(src, staging / entry, copy_function=_link_or_copy)
            elif src.is_file():
                _link_or_copy(str(src), str(staging / entry))
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _commit(staging: Path, final: Path) -> None:
    """Put the finished report in ``staging`` in place of ``final``: one atomic exchange where the
    system has it, else two renames (a kill between them is undone by the next run's
    :func:`_recover`); then carry over what the old folder held besides a report."""
    real = final.resolve()
    retired = _retired_dir(real)
    if _exchange(staging, real):
        os.replace(staging, retired)          # the old folder, now at the staging name
    else:
        os.replace(real, retired)
        os.replace(staging, real)
    _recover(real)


def _recover(real: Path) -> None:
    """Finish or undo a replacement that a kill stopped half way: with no report folder, the old one
    comes back; else the old folder's own entries (LLM cache, other files) move into the new one."""
    retired = _retired_dir(real)
    if not retired.exists():
        return
    if not real.exists():
        os.replace(retired, real)
        return
    _discard(retired, real)


def _discard(folder: Path, real: Path) -> None:
    """Remove ``folder``'s report files; its other entries move into ``real`` (never lost)."""
    for entry in os.listdir(folder):
        if entry not in _REPORT_ENTRIES and not (real / entry).exists():
            os.replace(folder / entry, real / entry)
    shutil.rmtree(folder)


# --- feature circuits ---------------------------------------------------------------------------

_ATTRIBUTION_FILES = ("attribution.json", "attribution_set.json")
_PAGE_EDGES = 120          # strongest edges per feature circuit kept for the page


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def _attribution(inputs: Inputs, stages: _Stages, comp: Any, summary: dict[str, Any], out: Path, dest: Path,
                 cfg: AnalyzeConfig) -> None:
    """Feature circuits per category (``attribution.json``, ``attribution_set.json``) and their
    comparison with the route circuits in ``summary["attribution"]``; switched off, the stage's
    files leave the report."""
    if not cfg.attribution or not inputs.categories:
        stages.forget("attribution", _ATTRIBUTION_FILES)
        why = "off (--no-attribution)" if not cfg.attribution else "no circuit categories"
        summary["attribution"] = {"skipped": why}
        return
    settings = _attribution_settings(cfg)
    data = stages.run("attribution", _attribution_stage(inputs, comp, settings, dest),
                      lambda: _load_attribution(out, settings))
    summary["attribution"] = _attribution_summary(data, summary.get("circuits"))


def _attribution_settings(cfg: AnalyzeConfig) -> dict[str, Any]:
    """What the stage's result depends on besides the cache key: its own settings and the
    pruning defaults of :func:`tl_modular.attribution.prune` and ``aggregate`` (read from them)."""
    import inspect

    from tl_modular.attribution import aggregate, prune

    def defaults(f: Callable[..., Any], names: tuple[str, ...]) -> dict[str, float]:
        params = inspect.signature(f).parameters
        return {n: params[n].default for n in names}
    return {"version": ATTRIBUTION_VERSION, "n_attribution": cfg.n_attribution, "baseline": "corrupted",
            "n_random": cfg.n_random, "prune": defaults(prune, ("node_threshold", "edge_threshold")),
            "min_frequency": defaults(aggregate, ("min_frequency",))["min_frequency"], "units": "compression",
            "min_influence": _MIN_INFLUENCE, "memory_gib": cfg.attribution_memory, "errors": "frozen",
            "folded": "ablated"}


def _attribution_stage(inputs: Inputs, comp: Any, settings: dict[str, Any], dest: Path) -> Callable[[], Any]:
    """Per category: pruned builds (``min_influence``) of attribution graphs of its first
    ``n_attribution`` prompts over the report's compression, one prompt at a time and each within
    the memory budget (:func:`_feature_graphs`), pruned with the default thresholds, verified by
    intervention (every other feature, folded ones included, set to its corrupted-run value, as
    the route circuits patch; error nodes at their clean values), then aggregated per category.
    A model the builder does not support, a category that is no task or whose graphs do not fit
    the budget, is skipped with the reason."""
    def run() -> dict[str, Any]:
        from tl_modular.attribution import aggregate, faithfulness, feature_masks, feature_name
        from tl_modular.attribution.build import unsupported
        from tl_modular.tasks import Task

        model = inputs.model
        data: dict[str, Any] = {"schema": "tl_modular.ReportAttribution", "version": ATTRIBUTION_VERSION,
                                "settings": settings, "skipped": unsupported(model, comp), "categories": {}}
        cats: dict[str, Any] = data["categories"]
        kept_per_task: dict[str, list[Any]] = {}
        nodes: dict[str, list[Any]] = {}         # feature -> [channel, stream] where it writes
        for name, task in ({} if data["skipped"] else inputs.categories).items():
            if not isinstance(task, Task):
                cats[name] = {"skipped": f"{type(task).__name__} prompts, not a tlm.Task: an attribution graph needs "
                                         "the task's answers for its logit node"}
                continue
            start = time.perf_counter()
            sub = task[: settings["n_attribution"]]
            built = _feature_graphs(model, sub, comp, settings)
            if "skipped" in built:
                cats[name] = built
                continue
            kept = built.pop("kept")
            # as masks: every feature outside the circuit is ablated, those the pruned build folded into
            # the error nodes too (as a full build's pruning would), and random sets draw from them all
            check = faithfulness(model, sub, comp, feature_masks(model, kept, comp), baseline=settings["baseline"],
                                 errors=settings["errors"], n_random=settings["n_random"])
            for k in kept:
                for node, keep in zip(k.graph.nodes, k.nodes.tolist(), strict=True):
                    if keep and node.kind == "feature":
                        nodes[feature_name(node)] = [node.channel, node.stream]
            kept_per_task[name] = kept
            cats[name] = {"n_prompts": len(sub), "faithfulness": check["faithfulness"], "random": check["random"],
                          "clean": check["clean"], "ablated": check["ablated"], **built,
                          "edges_kept": [k.n_edges for k in kept], "features_kept": [len(k.features()) for k in kept],
                          "n_streams": 2 * model.cfg.n_layers + 2, "seconds": round(time.perf_counter() - start, 2)}
        if kept_per_task:
            features = aggregate(kept_per_task, min_frequency=settings["min_frequency"])
            features.save(dest)
            for name, c in features.items():
                # what the page draws (attribution_set.json, the whole set, stays out of the page)
                cats[name].update(circuit={"features": c.size, "edges": len(c.edges), "error_share": c.error_share},
                                  features=[[f, _round(c.share[f]), c.frequency[f], *nodes[f]] for f in c.features],
                                  top_edges=[[s, t, _round(w), f] for s, t, w, f in c.edges[:_PAGE_EDGES]])
        elif not data["skipped"]:
            tasks = any(isinstance(t, Task) for t in inputs.categories.values())
            data["skipped"] = "no category's graphs fit the memory budget" if tasks else "no category is a tlm.Task"
        write_json(dest / "attribution.json", data)
        return data
    return run


_MIN_INFLUENCE = 1e-4      # the stage's pruned build: targets below this influence on the logit are skipped
_MAX_MIN_INFLUENCE = 1e-1  # the largest it goes to fit the memory budget before skipping a category


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _feature_graphs(model: Any, task: Any, comp: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Pruned attribution graphs of ``task``'s prompts, each within ``settings["memory_gib"]``.

    The full graph's size is estimated first (:func:`~tl_modular.attribution.build.graph_size`,
    from the compression's ranks and the prompt length); its nodes must fit the budget, and every
    build stops at the edges that fill the rest of it (``max_edges``): a build stopped there is
    done again with ten times the ``min_influence``, up to ``_MAX_MIN_INFLUENCE``. Each graph is
    pruned as soon as it is built and only its kept edges are held (the next prompt's build never
    sits beside a whole graph). Returns the pruned graphs (``"kept"``) with their sizes, or
    ``{"skipped": reason}``."""
    from tl_modular.attribution.build import EDGE_BYTES, GraphTooLargeError, graph_size

    budget = int(settings["memory_gib"] * 2**30)
    n_targets = max(len(set(torch.as_tensor(p).reshape(-1).tolist())) for p in task.positions)
    size = graph_size(model, comp, int(task.clean.shape[1]), n_targets)
    estimate = {"nodes": size.nodes, "edges": size.edges, "bytes": size.bytes}
    if size.node_bytes >= budget:
        return {"skipped": f"a graph's {size.nodes:,} nodes alone hold {_gib(size.node_bytes)}, over the "
                           f"attribution_memory budget of {_gib(budget)}: raise it, or compress to lower ranks",
                "estimate": estimate}
    max_edges = (budget - size.node_bytes) // EDGE_BYTES
    min_influence = settings["min_influence"]
    while True:
        try:
            return {"min_influence": min_influence, "estimate": estimate,
                    **_pruned_graphs(model, task, comp, settings, min_influence, max_edges)}
        except GraphTooLargeError as e:
            if min_influence * 10 > _MAX_MIN_INFLUENCE * (1 + 1e-9):
                return {"skipped": f"at min_influence={min_influence:g} a graph still passed the {e.max_edges:,} "
                                   f"edges that fit the attribution_memory budget of {_gib(budget)} (its full graph: "
                                   f"about {size.edges:,} edges, {_gib(size.bytes)}): raise the budget",
                        "estimate": estimate}
            min_influence *= 10


def _pruned_graphs(model: Any, task: Any, comp: Any, settings: dict[str, Any], min_influence: float,
                   max_edges: int) -> dict[str, Any]:
    """Each prompt's graph built at ``min_influence`` (stopping past ``max_edges``), its sizes
    recorded and only its pruned part kept."""
    from tl_modular.attribution import attribution_graph, prune

    kept, sizes = [], {"completeness": 0.0, "nodes": [], "edges": [], "features_folded": []}
    for i in range(len(task)):
        graph = attribution_graph(model, task[i:i + 1], units=comp, min_influence=min_influence,
                                  max_edges=max_edges)[0]
        sizes["completeness"] = max(sizes["completeness"], graph.completeness())
        sizes["nodes"].append(len(graph))
        sizes["edges"].append(int(graph.adjacency._nnz()))
        sizes["features_folded"].append(graph.info["dropped_features"])
        kept.append(_kept_part(prune(graph, **settings["prune"])))
        del graph
    return {"kept": kept, **sizes}


def _kept_part(pruned: Any) -> Any:
    """``pruned`` over a copy of its graph holding only the kept edges (what faithfulness and
    ``aggregate`` read of it), so a category's graphs need not stay in memory whole."""
    from tl_modular.attribution import Pruned

    g = pruned.graph
    a = g.adjacency.coalesce()
    index, values = a.indices()[:, pruned.edges], a.values()[pruned.edges]
    small = replace(g, adjacency=torch.sparse_coo_tensor(index, values, a.shape, check_invariants=False).coalesce(),
                    writes=None, info={k: v for k, v in g.info.items() if not k.startswith("_")})
    return Pruned(graph=small, nodes=pruned.nodes, edges=torch.ones(values.numel(), dtype=torch.bool),
                  node_influence=pruned.node_influence)


def _load_attribution(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The saved stage, if made with these settings and with its feature circuits whole."""
    from tl_modular.attribution import AttributionSet

    data = read_json(out / "attribution.json")
    if not isinstance(data, dict) or data.get("settings") != settings:
        raise ValueError("feature circuits of other settings")
    if any("skipped" not in c for c in data["categories"].values()):
        AttributionSet.load(out)                 # present and readable, else the stage runs again
    return data


def _attribution_summary(data: dict[str, Any], circuits: dict[str, Any] | None) -> dict[str, Any]:
    """Per category: the feature circuit's size, edges and faithfulness beside the route circuit's."""
    routes = (circuits or {}).get("categories", {})
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    cats = {}
    for name, c in data["categories"].items():
        if "skipped" in c:
            cats[name] = {"skipped": c["skipped"], "estimate": c.get("estimate")}
            continue
        r = routes.get(name)
        cats[name] = {"n_prompts": c["n_prompts"], "faithfulness": c["faithfulness"],
                      "random": mean(c["random"]), "completeness": c["completeness"],
                      "edges_kept": mean(c["edges_kept"]), "edges": mean(c["edges"]),
                      "min_influence": c["min_influence"], "features_folded": mean(c["features_folded"]),
                      "estimate": c["estimate"],
                      "features": c.get("circuit", {}).get("features"),
                      "circuit_edges": c.get("circuit", {}).get("edges"),
                      "routes": None if r is None else {"size": r["size"], "of": (circuits or {}).get("n_routes"),
                                                         "faithfulness": r["faithfulness"]}}
    return {"settings": data["settings"], "skipped": data["skipped"], "categories": cats}


def _label_stage(inputs: Inputs, graph: Any, modules: list, summary: dict, out: Path, cfg: AnalyzeConfig,
                 circuits: Any, comp: Any) -> Callable[[], Any]:
    """Labels, bottom-up: the channels, the modules (with their members' labels as evidence), then
    the most polysemantic units (neurons and read directions), ``cfg.n_label_units`` in all."""
    from tl_modular import labeling

    def run() -> Any:
        model = inputs.model
        names = [n for n in graph.channels if any(n in m for m in modules)] or graph.channels
        channels = labeling.channel_units(model, [n for n in names if parse(n).kind in ("head", "mlp", "bias")])
        mods = [labeling.module_unit(model, module_name(i), sorted(m, key=names.index), members=sorted(m))
                for i, m in enumerate(modules) if m]
        units = channels[:max(cfg.n_label_units - len(mods), 0)] + mods[:cfg.n_label_units]
        kept = {u.name for u in units}
        units = [u if u.kind != "module" else replace(u, members=tuple(x for x in u.members if x in kept))
                 for u in units]
        for row in (summary.get("polysemanticity") or {}).get("rows", []):
            if len(units) >= cfg.n_label_units:
                break
            name = row["unit"]                                  # a neuron L1.MLP.N42 or a read direction L1.H2:k.d3
            if name not in kept:
                units.append(labeling.unit_named(model, name, comp=comp))
                kept.add(name)
        labels = labeling.label(units, model, inputs.tokens, labeler=inputs.labeler, simulator=inputs.simulator,
                                attention_mask=inputs.attention_mask, graph=graph, circuits=circuits,
                                progress=False)
        labels.save(out / "labels.json")
        rows = redact_obj([lab.to_json(evidence=False) for lab in labels])   # as labels.json: no secret
        write_json(out / "labels_summary.json", {"labels": rows, "baseline": labels.baseline,
                                                 "usage": labels.usage, "stopped": labels.stopped})
        return {"labels": rows, "baseline": labels.baseline, "usage": labels.usage, "stopped": labels.stopped}
    return run


def _complete_labels(path: Path) -> dict[str, Any]:
    """Saved labels, unless the run stopped early or some failed: then the stage runs again (its LLM
    replies are cached, so only what is missing costs anything)."""
    data = read_json(path)
    if data.get("stopped") or any(row["status"] != "ok" for row in data["labels"]):
        raise ValueError("incomplete labels")
    return data


def _count(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in items:
        counts[i] = counts.get(i, 0) + 1
    return counts
