"""Multi-file artifacts never load as a mix of two saves.

A save is interrupted after each of its writes (the write helper raises after the k-th file),
over an older artifact of the same architecture; the load then gives the old artifact whole,
the new one whole, or an ArtifactError saying the save was interrupted, never old index + new
tensors (issue 28: that loaded silently with the old fingerprint and the new numbers).
"""

from __future__ import annotations

import copy
import json
import shutil

import _bad
import numpy as np
import pytest
import torch

import tl_modular as tlm
import tl_modular._io as tio
import tl_modular.compression.compression as cmod
from tl_modular.compression import Compression
from tl_modular.errors import ArtifactError
from tl_modular.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class _Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may swallow it)."""


def _interrupt_after(monkeypatch, k: int) -> None:
    """The (k+1)-th atomic file write of the next save never happens."""
    real, count = tio._atomic, {"n": 0}

    def atomic(path, write):
        if count["n"] >= k:
            raise _Killed(f"killed before writing {path.name}")
        count["n"] += 1
        real(path, write)
    monkeypatch.setattr(tio, "_atomic", atomic)


def _count_writes(monkeypatch, save) -> int:
    real, count = tio._atomic, {"n": 0}

    def atomic(path, write):
        count["n"] += 1
        real(path, write)
    with monkeypatch.context() as m:
        m.setattr(tio, "_atomic", atomic)
        save()
    return count["n"]


def _same_compression(a: Compression, b: Compression) -> bool:
    return a.model_fingerprint == b.model_fingerprint and a.sides().keys() == b.sides().keys() and all(
        torch.equal(a.sides()[k].full_encoder.float(), b.sides()[k].full_encoder.float()) for k in a.sides())


def _unbound_safetensors(path, tensors, metadata):
    tio.write_safetensors(path, tensors, {"kind": metadata["kind"]})


def _unbound_json(path, obj):
    tio.write_json(path, {k: v for k, v in obj.items() if k != "files"})


@pytest.fixture(scope="module")
def compressions():
    data = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(3))
    old = tlm.compress(tiny_model("gpt2", seed=0), data, progress=False)
    new = tlm.compress(tiny_model("gpt2", seed=1), data, progress=False)   # same architecture, other weights
    return old, new


@pytest.mark.parametrize("older_release", [False, True])
def test_interrupted_compression_save_never_loads_as_a_mix(tmp_path, monkeypatch, compressions, older_release):
    old, new = compressions
    n_writes = _count_writes(monkeypatch, lambda: new.save(tmp_path / "count"))
    assert n_writes == 2
    seen = set()
    for k in range(n_writes + 1):
        d = tmp_path / f"k{k}"
        if older_release:  # saved as before files were bound: no binding record in either file
            with monkeypatch.context() as m:
                m.setattr(cmod, "write_safetensors", _unbound_safetensors)
                m.setattr(cmod, "write_json", _unbound_json)
                old.save(d)
            assert "files" not in json.loads((d / "compression.json").read_text())
        else:
            old.save(d)
        with monkeypatch.context() as m:
            _interrupt_after(m, k)
            try:
                new.save(d)
            except _Killed:
                pass
        try:
            got = Compression.load(d)
        except ArtifactError as e:
            _bad.tried()
            assert "interrupted" in str(e) and "compression.json" in str(e) and "compression.safetensors" in str(e)
            seen.add("error")
            continue
        assert _same_compression(got, old) or _same_compression(got, new), f"a mix after {k} writes"
        seen.add("old" if _same_compression(got, old) else "new")
    assert seen == {"old", "error", "new"}


def test_interrupted_toy_model_save_never_loads_as_a_mix(tmp_path, monkeypatch):
    old = tlm.toy.load_model()
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01)
    n_writes = _count_writes(monkeypatch, lambda: tlm.toy.save_model(new, tmp_path / "count"))
    seen = set()
    for k in range(n_writes + 1):
        d = tmp_path / f"k{k}"
        tlm.toy.save_model(old, d)
        with monkeypatch.context() as m:
            _interrupt_after(m, k)
            try:
                tlm.toy.save_model(new, d)
            except _Killed:
                pass
        try:
            got = tlm.toy.load_model(d)
        except ArtifactError as e:
            _bad.tried()
            assert "interrupted" in str(e) and "config.json" in str(e) and "model.safetensors" in str(e)
            seen.add("error")
            continue
        state = got.state_dict()
        which = [name for name, m in (("old", old), ("new", new))
                 if all(torch.equal(state[n], v) for n, v in m.state_dict().items())]
        assert which, f"a mix after {k} writes"
        seen.add(which[0])
    assert seen == {"old", "error", "new"}


def test_interrupted_build_checkpoint_never_resumes_from_a_mix(tmp_path, monkeypatch):
    from tl_modular.training import BuildConfig
    from tl_modular.training.build_state import _checkpoint, _resume

    cfg, root = BuildConfig(), tmp_path / "build"
    root.mkdir()
    old, new = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    seen = set()
    for k in range(3):
        _checkpoint(root, old, cfg, {"run": "old"}, [])
        with monkeypatch.context() as m:
            _interrupt_after(m, k)
            try:
                _checkpoint(root, new, cfg, {"run": "new"}, [])
            except _Killed:
                pass
        into = tiny_model("gpt2", seed=2)
        try:
            state = _resume(root, cfg, into)
        except ArtifactError as e:
            _bad.tried()
            assert "interrupted" in str(e) and "build_state.json" in str(e) and "model.safetensors" in str(e)
            seen.add("error")
            continue
        which = state["initial"]["run"]
        weights = (old if which == "old" else new).state_dict()
        assert all(torch.equal(v, weights[n]) for n, v in into.state_dict().items()), f"a mix after {k} writes"
        seen.add(which)
    assert seen == {"old", "error", "new"}


@pytest.fixture(scope="module")
def analyses():
    """Two (compression, graph, circuits) of the same model on other data: the same fingerprint, so
    only the digests tell them apart (what a report re-run with more tokens writes over the old)."""
    model = tiny_model("gpt2", seed=0)
    out = []
    for seed in (3, 4):
        data = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(seed))
        comp = tlm.compress(model, data, progress=False)
        graph = tlm.build_graph(comp, model=model, tokens=data, progress=False)
        circuits = graph.circuits(model, {"all": data}, n_boot=2, n_random=1, search="greedy", progress=False)
        out.append((comp, graph, circuits))
    return out


def _save_all(d, comp, graph, circuits) -> None:
    comp.save(d / "compression")
    graph.save(d)
    circuits.save(d)


@pytest.mark.parametrize("older_release", [False, True])
def test_interrupted_graph_and_circuits_save_never_load_as_a_mix(tmp_path, monkeypatch, analyses, older_release):
    old, new = analyses
    assert old[0].model_fingerprint == new[0].model_fingerprint and old[0].digest() != new[0].digest()
    n_writes = _count_writes(monkeypatch, lambda: _save_all(tmp_path / "count", *new))
    assert n_writes == 4
    seen = set()
    for k in range(n_writes + 1):
        d = tmp_path / f"k{k}"
        _save_all(d, *old)
        if older_release:  # graph and circuits saved before they recorded digests: they load as before
            for name, key in (("graph.json", "compression_digest"), ("circuits.json", "graph_digest")):
                meta = json.loads((d / name).read_text())
                meta.pop(key)
                (d / name).write_text(json.dumps(meta))
        with monkeypatch.context() as m:
            _interrupt_after(m, k)
            try:
                _save_all(d, *new)
            except _Killed:
                pass
        got = []
        try:
            comp = Compression.load(d / "compression")
            got.append("old" if _same_compression(comp, old[0]) else "new" if _same_compression(comp, new[0]) else "?")
            graph = tlm.ChannelGraph.load(d, compression=comp)
            got.append("old" if graph.routes() == old[1].routes() else "new" if graph.routes() == new[1].routes()
                       else "?")
            circuits = tlm.circuits.CircuitSet.load(d)
            got.append({json.dumps(c.to_json()): w for c, w in ((old[2]["all"], "old"), (new[2]["all"], "new"))}
                       .get(json.dumps(circuits["all"].to_json()), "?"))
        except ArtifactError as e:
            _bad.tried()
            assert "interrupted" in str(e) and str(d) in str(e), e   # which save, and the file(s)
            seen.add("error")
            continue
        if older_release and len(set(got)) > 1:
            seen.add("mix (older release)")   # what the digests prevent: files from two saves, no error
            continue
        assert len(set(got)) == 1 and "?" not in got, f"a mix after {k} writes: {got}"
        seen.add(got[0])
    # files of an older release still load; the compression's own binding still refuses its half save
    assert seen == {"old", "error", "new"} | ({"mix (older release)"} if older_release else set())


def test_circuits_load_checks_the_graph_given(analyses, tmp_path):
    (_, old_graph, old_circuits), (_, new_graph, _) = analyses
    old_circuits.save(tmp_path)
    assert tlm.circuits.CircuitSet.load(tmp_path, graph=old_graph).graph_digest == old_graph.digest()
    with _bad.raises(ArtifactError, match="the graph given come from different saves"):
        tlm.circuits.CircuitSet.load(tmp_path, graph=new_graph)


# --- the report directory --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report_runs():
    from tl_modular import report

    model = tiny_model("gpt2", seed=0)

    def inputs(seed):
        tokens = torch.randint(0, 50, (16, 10), generator=torch.Generator().manual_seed(seed))
        return report.Inputs(model=model, tokens=tokens, name="tiny", categories={"all": tokens[:8]})
    cfg = report.AnalyzeConfig(n_null=2, budgets=2, n_boot=2, n_random=1, batch_size=8, n_label_units=2)
    return inputs(3), inputs(4), cfg


def _files(d) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _report_files(d) -> dict[str, bytes]:
    """The report's own files (those a run writes; not the LLM cache, not the user's)."""
    return {k: v for k, v in _files(d).items() if k.split("/")[0] not in ("llm_cache", "notes.txt")}


def _old_report(out, inputs, cfg) -> dict[str, bytes]:
    from tl_modular import report

    report.analyze(inputs, out, cfg, progress=False)
    (out / "llm_cache").mkdir()
    (out / "llm_cache" / "reply.json").write_text("{}")     # what the labeler caches under --out
    (out / "notes.txt").write_text("the user's own file")
    return _files(out)


def _patch_writes(m, hook) -> None:
    """Every atomic write of the report (JSON, tensors, pages, figures) calls ``hook(path)`` first."""
    import tl_modular.report.figures as figures
    import tl_modular.report.html as html

    real = tio._atomic

    def atomic(path, write):
        hook(path)
        real(path, write)
    for module in (tio, html, figures):
        m.setattr(module, "_atomic", atomic)


def test_a_report_run_never_touches_the_old_report_until_it_is_complete(tmp_path, monkeypatch, report_runs):
    """At every write of a new run (where a kill could land) the old report is there, whole; a kill
    in the middle leaves it so, the next run resumes from the stages done and then replaces it."""
    from tl_modular import report
    from tl_modular.report.pipeline import staging_dir

    old_in, new_in, cfg = report_runs
    out = tmp_path / "report"
    old = _old_report(out, old_in, cfg)
    writes = []

    def unchanged(path):
        assert _files(out) == old, f"the old report changed before {path.name} was written"
        writes.append(path.name)
    with monkeypatch.context() as m:
        _patch_writes(m, unchanged)
        m.setattr(report.pipeline, "_commit", lambda staging, final: (_ for _ in ()).throw(_Killed("at the end")))
        with pytest.raises(_Killed):
            report.analyze(new_in, out, cfg, progress=False)
    assert len(writes) > 15 and {"graph.json", "circuits.json", "report.html"} <= set(writes)
    # killed in the middle: the old report whole, the stages done kept beside it
    shutil.rmtree(staging_dir(out))
    with monkeypatch.context() as m:
        _interrupt_after(m, 9)
        with pytest.raises(_Killed):
            report.analyze(new_in, out, cfg, progress=False)
    _bad.tried()
    assert _files(out) == old
    done = set(json.loads((staging_dir(out) / "manifest.json").read_text())["stages"])
    assert {"compression", "rank_fidelity"} <= done and "labels" not in done
    report.analyze(new_in, out, cfg, progress=False)          # resumes
    summary = json.loads((out / "summary.json").read_text())
    assert done <= set(summary["reused"]) and "labels" not in summary["reused"]
    assert not staging_dir(out).exists() and not (tmp_path / ".report.old").exists()
    fresh = tmp_path / "fresh"
    report.analyze(new_in, fresh, cfg, progress=False)        # the same report, uninterrupted
    for name in ("graph.json", "modules.json", "compression/compression.safetensors"):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name
    # the resumed circuits ran on the compression as stored (float32), the fresh ones on float64
    got, want = (tlm.circuits.CircuitSet.load(d)["all"] for d in (out, fresh))
    assert got.scores.keys() == want.scores.keys()
    assert np.allclose(list(got.scores.values()), list(want.scores.values()), rtol=1e-4, atol=1e-7)
    # what the report does not write itself is carried over
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "llm_cache" / "reply.json").exists()


@pytest.mark.parametrize("exchange", [True, False])
def test_a_report_killed_while_it_replaces_the_old_is_old_or_new_whole(tmp_path, monkeypatch, report_runs, exchange):
    """Kills before each rename/removal of the replacement (with the atomic exchange, and with the
    two renames used where there is none): the folder holds the old report or the new one whole
    (or, between the two renames, none: the next run puts the old one back), never a mix; the next
    run finishes the replacement and loses none of the user's files."""
    from tl_modular import report
    from tl_modular.report import pipeline

    old_in, new_in, cfg = report_runs
    out = tmp_path / "template" / "report"
    old = _old_report(out, old_in, cfg)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "_commit", lambda staging, final: (_ for _ in ()).throw(_Killed("at the end")))
        with pytest.raises(_Killed):
            report.analyze(new_in, out, cfg, progress=False)
    new = _report_files(pipeline.staging_dir(out))
    seen, j = set(), 0
    while True:
        d = tmp_path / f"j{j}"
        shutil.copytree(tmp_path / "template", d, symlinks=True)
        final = d / "report"
        calls = {"n": 0}

        def step(real, *args, calls=calls, j=j):
            if calls["n"] >= j:
                raise _Killed(f"killed before step {j}")
            calls["n"] += 1
            return real(*args)
        with monkeypatch.context() as m:
            import os as _os
            m.setattr(pipeline.os, "replace", lambda a, b, real=_os.replace: step(real, a, b))
            m.setattr(pipeline.shutil, "rmtree", lambda p, real=shutil.rmtree: step(real, p))
            m.setattr(pipeline, "_exchange", (lambda a, b, real=pipeline._exchange: step(real, a, b)) if exchange
                      else (lambda a, b: False))
            try:
                pipeline._commit(pipeline.staging_dir(final), final)
                finished = True
            except _Killed:
                finished = False
        _bad.tried()
        if not final.exists():
            seen.add("none")
        elif _files(final) == old:
            seen.add("old")
        else:
            assert _report_files(final) == new, f"a mix after {j} steps"
            seen.add("new")
        report.analyze(new_in, final, cfg, progress=False)    # recovers, reuses every stage, replaces
        summary = json.loads((final / "summary.json").read_text())
        assert "labels" in summary["reused"] and "graph" in summary["reused"]
        assert (final / "notes.txt").exists() and (final / "llm_cache" / "reply.json").exists(), f"lost after {j}"
        assert sorted(p.name for p in d.iterdir()) == ["report"], f"left over after {j} steps"
        if finished:
            break
        j += 1
    assert seen == ({"old", "new"} if exchange else {"old", "none", "new"})
