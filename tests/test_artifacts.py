"""One artifact convention: every save writes a versioned JSON header (``schema`` + ``version``) next to
its tensors, and every load still reads the files tl_modular 0.1.0.dev0 wrote (tests/data/artifacts_0_1,
written by tests/data/make_artifacts.py with that release)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tl_modular as tlm
from tl_modular import labeling
from tl_modular._io import SCHEMA_VERSION
from tl_modular.circuits import CircuitSet
from tl_modular.testing import tiny_model

OLD = Path(__file__).parent / "data" / "artifacts_0_1"


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", seed=0)           # the model the old artifacts were made of


def test_old_artifacts_load(model):
    comp = tlm.Compression.load(OLD / "compression", model)
    assert len(comp) == 10 and comp.total_rank == 40 and json.loads((OLD / "compression" / "compression.json")
                                                                      .read_text())["kind"] == "compression"
    graph = tlm.ChannelGraph.load(OLD / "graph", compression=comp)
    assert set(comp) <= set(graph.channels) and graph.weight == "data"
    circuits = CircuitSet.load(OLD / "graph")
    assert list(circuits) == ["text"] and circuits["text"].routes
    d = tlm.ModelDiff.load(OLD / "diff")
    assert d.channels and d.routes == []                 # a diff of compressions: channel angles only
    labels = labeling.Labels.load(OLD / "labels.json")
    assert sorted(lab.unit for lab in labels) == ["L0.MLP.N0", "L0.MLP.N1"]
    # what was computed from them then and now agrees: the old compression runs the model as the new one does
    tokens = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(1))
    again = tlm.Compression.load(OLD / "compression")
    with comp.applied(model):
        a = model(tokens)
    with again.applied(model):
        b = model(tokens)
    torch.testing.assert_close(a, b)


def test_compression_writes_the_common_header_and_reads_both(model, tmp_path):
    comp = tlm.Compression.load(OLD / "compression", model)
    comp.save(tmp_path / "new")
    header = json.loads((tmp_path / "new" / "compression.json").read_text())
    assert header["schema"] == "tl_modular.Compression" and header["version"] == SCHEMA_VERSION
    assert "kind" not in header and "schema_version" not in header
    new = tlm.Compression.load(tmp_path / "new", model)
    assert new.total_rank == comp.total_rank and list(new) == list(comp)
    for name in comp:
        torch.testing.assert_close(new[name].write.basis, comp[name].write.basis)
    # a copy of an old directory and a new one: both load; a file of neither kind is refused by name
    shutil.copytree(OLD / "compression", tmp_path / "old")
    assert list(tlm.Compression.load(tmp_path / "old")) == list(comp)
    (tmp_path / "new" / "compression.json").write_text(json.dumps({**header, "schema": "tl_modular.ChannelGraph"}))
    with pytest.raises(tlm.ArtifactError, match="compression.json is not a tl_modular.Compression file"):
        tlm.Compression.load(tmp_path / "new")


def test_every_save_takes_a_directory(model, tmp_path):
    """Labels.save takes a directory like every other save (``labels.json`` inside); the file form stays."""
    labels = labeling.Labels.load(OLD / "labels.json")
    assert labels.save(tmp_path / "dir") == tmp_path / "dir" / "labels.json"
    assert labels.save(tmp_path / "file.json") == tmp_path / "file.json"
    for where in (tmp_path / "dir", tmp_path / "dir" / "labels.json", tmp_path / "file.json"):
        again = labeling.Labels.load(where)
        assert [lab.to_json() for lab in again] == [lab.to_json() for lab in labels]
    header = json.loads((tmp_path / "dir" / "labels.json").read_text())
    assert header["schema"] == "tl_modular.labels" and header["version"] == SCHEMA_VERSION
    for name, saved in (("graph.json", OLD / "graph"), ("diff.json", OLD / "diff")):
        meta = json.loads((saved / name).read_text())
        assert meta["schema"].startswith("tl_modular.") and meta["version"] == SCHEMA_VERSION, name
