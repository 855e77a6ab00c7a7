"""Multi-file artifacts never load as a mix of two saves.

A save is interrupted after each of its writes (the write helper raises after the k-th file),
over an older artifact of the same architecture; the load then gives the old artifact whole,
the new one whole, or an ArtifactError saying the save was interrupted, never old index + new
tensors (issue 28: that loaded silently with the old fingerprint and the new numbers).
"""

from __future__ import annotations

import copy
import json

import _bad
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
    from tl_modular.training.interpretable import BuildConfig, _checkpoint, _resume

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
