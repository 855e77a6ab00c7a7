"""Bad input, tried on purpose: every artifact loader against damaged files (truncated, bytes
flipped, a newer or older format version, missing fields, tensors of the wrong shape, the wrong
model), public arguments beyond what the model or graph can give, and token tensors drawn by
hypothesis. Each must end in an exception that names the file or the argument — never a bare
JSONDecodeError/SafetensorError, never a silently different result, never a hook left behind.

Every bad input counts towards the number the README quotes (``_bad.tried``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _bad import raises, tried
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tl_modular as tlm
from tl_modular import _io
from tl_modular._models import count_hooks, fingerprint
from tl_modular.circuits import CircuitSet
from tl_modular.compression import Compression
from tl_modular.errors import ArtifactError
from tl_modular.graph import ChannelGraph
from tl_modular.testing import tiny_model

D_VOCAB, N_CTX = 50, 32        # the tiny models'
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One saved artifact of every kind tl_modular reads, from a tiny model."""
    from sae_lens import StandardSAE, StandardSAEConfig

    from tl_modular.training import BuildConfig
    from tl_modular.training.build_result import _MODEL
    from tl_modular.training.build_state import _save_state
    from tl_modular.training.trainer import TrainConfig, TrainResult, _save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("artifacts")
    model, other = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    data = torch.randint(0, D_VOCAB, (16, 10), generator=torch.Generator().manual_seed(3))
    comp = tlm.compress(model, data, progress=False)
    graph = tlm.build_graph(comp, model=model, tokens=data, progress=False)
    circuits = graph.circuits(model, {"all": data[:8]}, n_boot=5, n_random=1, search="greedy", progress=False)
    comp.save(root / "compression")
    graph.save(root / "graph")
    circuits.save(root / "graph")
    labels = tlm.label(tlm.labeling.neurons(model, 0, [0, 1]), model, data, n_baseline=0, n_boot=5, progress=False)
    labels.save(root / "labels.json")
    same = tlm.diff(comp, comp)
    same.save(root / "diff")
    cfg = StandardSAEConfig(d_in=model.cfg.d_model, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    tlm.sae.save_atomic(StandardSAE(cfg), root / "sae")
    tlm.toy.save_model(model, root / "toy")
    trained = tiny_model("gpt2", seed=0)                   # one optimizer step: a checkpoint with optimizer state
    opt = torch.optim.AdamW(trained.parameters())
    trained(data[:2], return_type="loss").backward()
    opt.step()
    train_cfg = TrainConfig(steps=1)
    _save_checkpoint(root / "train_state.safetensors", trained, opt, torch.Generator().manual_seed(0), train_cfg,
                     TrainResult(model=trained, step=1))
    (root / "build").mkdir()
    _save_state(root / "build", BuildConfig(), {"x": 1}, [])
    _io.write_safetensors(root / "build" / _MODEL, model.state_dict())
    return SimpleNamespace(root=root, model=model, other=other, data=data, comp=comp, graph=graph, same=same,
                           train_cfg=train_cfg, build_cfg=BuildConfig())


def _load_train_state(w, path):
    from tl_modular.training.trainer import _load_checkpoint

    model = tiny_model("gpt2", seed=0)
    return _load_checkpoint(path, model, torch.optim.AdamW(model.parameters()), torch.Generator(), w.train_cfg)


def _load_build(w, path):
    from tl_modular.training.build_state import _resume

    return _resume(path.parent, w.build_cfg, tiny_model("gpt2", seed=0))


# name: (file under the artifacts folder, load(world, file), version field or None, a required field)
LOADERS = {
    "compression.json": ("compression/compression.json", lambda w, p: Compression.load(p.parent),
                         "version", "channels"),
    "compression.safetensors": ("compression/compression.safetensors", lambda w, p: Compression.load(p.parent),
                                None, None),
    "graph.json": ("graph/graph.json", lambda w, p: ChannelGraph.load(p.parent), "version", "nodes"),
    "circuits.json": ("graph/circuits.json", lambda w, p: CircuitSet.load(p.parent), "version", "circuits"),
    "labels.json": ("labels.json", lambda w, p: tlm.labeling.Labels.load(p), "version", "labels"),
    "diff.json": ("diff/diff.json", lambda w, p: tlm.ModelDiff.load(p.parent), "version", "routes"),
    "sae cfg.json": ("sae/cfg.json", lambda w, p: tlm.sae.load(p.parent), None, "d_in"),
    "sae weights": ("sae/sae_weights.safetensors", lambda w, p: tlm.sae.load(p.parent), None, None),
    "toy config.json": ("toy/config.json", lambda w, p: tlm.toy.load_model(p.parent), None, "config"),
    "toy model.safetensors": ("toy/model.safetensors", lambda w, p: tlm.toy.load_model(p.parent), None, None),
    "train checkpoint": ("train_state.safetensors", _load_train_state, None, None),
    "build state": ("build/build_state.json", _load_build, "version", "done"),
    "build model": ("build/model.safetensors", _load_build, None, None),
}
# sae-lens writes its own files: no content hash, so flipped data bytes cannot be told from weights
_UNHASHED = {"sae weights"}


def _damaged(name: str, path: Path, data: bytes) -> list[tuple[str, bytes]]:
    """Truncations and flipped bytes of ``data``, each of which must be refused."""
    out = [("empty", b""), ("half", data[: len(data) // 2]), ("one byte short", data.rstrip()[:-1])]
    if path.suffix == ".json":
        # 0xFF is never valid UTF-8: wherever it lands, the JSON is unreadable
        for frac in (0.0, 0.5, 0.97):
            i = min(int(frac * len(data)), len(data) - 2)
            out.append((f"byte {i} -> 0xFF", data[:i] + b"\xff" + data[i + 1:]))
        out.append(("a pickle instead", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."))
        return out
    header = 8 + int.from_bytes(data[:8], "little")
    positions = [3, 12, header - 3] + ([] if name in _UNHASHED else [header + 5, len(data) - 1])
    for i in positions:
        out.append((f"byte {i} flipped", data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]))
    out.append(("a pickle instead", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."))
    return out


@pytest.mark.parametrize("name", list(LOADERS))
def test_damaged_artifacts_are_refused_naming_the_file(world, name, tmp_path):
    rel, load, _, _ = LOADERS[name]
    path = world.root / rel
    good = path.read_bytes()
    load(world, path)                                       # the intact artifact loads
    try:
        for what, bad in _damaged(name, path, good):
            path.write_bytes(bad)
            tried()
            with pytest.raises(ArtifactError) as err:
                load(world, path)
            assert path.name in str(err.value), (name, what, str(err.value))
            assert "write it again" in str(err.value) or "upgrade" in str(err.value), (name, what)
    finally:
        path.write_bytes(good)
    load(world, path)


def test_json_errors_give_line_and_column(world):
    path = world.root / "graph" / "graph.json"
    good = path.read_text()
    try:
        lines = good.splitlines()
        lines[3] = lines[3].replace(":", "", 1)              # a missing colon on line 4
        path.write_text("\n".join(lines))
        with raises(ArtifactError, match=r"graph\.json is not valid JSON \(Expecting ':' delimiter at line 4, "
                                         r"column \d+\)"):
            ChannelGraph.load(path.parent)
        path.write_text(good[: len(good) // 3])
        with raises(ArtifactError, match=r"graph\.json is not valid JSON .* the file ends early"):
            ChannelGraph.load(path.parent)
    finally:
        path.write_text(good)


@pytest.mark.parametrize("name", [n for n, spec in LOADERS.items() if spec[2] is not None])
def test_format_versions_newer_refused_older_named(world, name):
    rel, load, key, required = LOADERS[name]
    path = world.root / rel
    good = path.read_text()
    doc = json.loads(good)
    try:
        path.write_text(json.dumps({**doc, key: _io.SCHEMA_VERSION + 1}))
        with raises(ArtifactError, match=rf"{path.name} was written in .* format version {_io.SCHEMA_VERSION + 1}, "
                                         rf"newer than version {_io.SCHEMA_VERSION}.*upgrade tl_modular"):
            load(world, path)
        path.write_text(json.dumps({**doc, key: _io.SCHEMA_VERSION - 1}))
        with raises(ArtifactError, match=rf"{path.name} was written in .* format version {_io.SCHEMA_VERSION - 1}, "
                                         "older than .* cannot migrate it"):
            load(world, path)
        path.write_text(json.dumps({**doc, key: "one"}))
        with raises(ArtifactError, match="not an integer"):
            load(world, path)
        path.write_text(json.dumps({k: v for k, v in doc.items() if k != required}))
        with raises(ArtifactError, match=rf"{path.name} lacks the field.*{required}"):
            load(world, path)
        path.write_text(json.dumps([doc]))
        with raises(ArtifactError, match=rf"{path.name} holds a JSON list"):
            load(world, path)
    finally:
        path.write_text(good)


def test_safetensors_written_by_a_newer_release_is_refused(world, tmp_path):
    path = tmp_path / "x.safetensors"
    _io.write_safetensors(path, {"a": torch.zeros(2)}, {"schema_version": _io.SCHEMA_VERSION + 1})
    with raises(ArtifactError, match=rf"x\.safetensors was written in safetensors format version "
                                     rf"{_io.SCHEMA_VERSION + 1}, newer"):
        _io.read_safetensors(path)


def test_older_versions_migrate_when_a_migration_exists(tmp_path):
    _io.write_json(tmp_path / "a.json", {"schema": "s", "version": _io.SCHEMA_VERSION - 1, "old": 3})
    meta = _io.read_versioned_json(tmp_path, "a.json", "s", "w", required=("new",),
                                   migrations={_io.SCHEMA_VERSION - 1: lambda d: {**d, "new": d.pop("old")}})
    assert meta["new"] == 3 and meta["version"] == _io.SCHEMA_VERSION
    with raises(ArtifactError, match=r"a\.json lacks the field .absent."):   # a migration that cannot apply
        _io.read_versioned_json(tmp_path, "a.json", "s", "w",
                                migrations={_io.SCHEMA_VERSION - 1: lambda d: {**d, "new": d["absent"]}})
    with raises(FileNotFoundError, match="no b.json in .*write one with w"):
        _io.read_versioned_json(tmp_path, "b.json", "s", "w")


def test_wrong_shapes_and_missing_tensors_name_the_tensor(world, tmp_path):
    src = world.root / "compression"
    d = tmp_path / "c"
    shutil.copytree(src, d)
    tensors, meta = _io.read_safetensors(d / "compression.safetensors")
    key = next(k for k in tensors if k.endswith("/mean"))
    _io.write_safetensors(d / "compression.safetensors", {**tensors, key: torch.zeros(3)}, meta)
    with raises(ArtifactError, match=rf"compression\.safetensors: tensor '{key}' has shape \(3,\), expected"):
        Compression.load(d)
    _io.write_safetensors(d / "compression.safetensors", {k: v for k, v in tensors.items() if k != key}, meta)
    with raises(ArtifactError, match=rf"compression\.safetensors lacks the tensor \['{key}'\]"):
        Compression.load(d)
    doc = json.loads((d / "compression.json").read_text())
    name = next(iter(doc["channels"]))
    doc["channels"][name]["sides"]["write"]["rank"] = 10_000
    _io.write_safetensors(d / "compression.safetensors", tensors, meta)
    (d / "compression.json").write_text(json.dumps(doc))
    with raises(ArtifactError, match=r"compression\.json is malformed .*rank 10000 outside"):
        Compression.load(d)
    # a toy checkpoint whose weights do not fit its config
    toy = tmp_path / "toy"
    shutil.copytree(world.root / "toy", toy)
    state, _ = _io.read_safetensors(toy / "model.safetensors")
    state["embed.W_E"] = torch.zeros(7, 7)
    _io.write_safetensors(toy / "model.safetensors", state)
    with raises(ArtifactError, match=r"model\.safetensors is malformed .*size mismatch"):
        tlm.toy.load_model(toy)
    # an SAE whose weights do not fit its cfg.json
    sae = tmp_path / "sae"
    shutil.copytree(world.root / "sae", sae)
    cfg = json.loads((sae / "cfg.json").read_text())
    (sae / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 64}))
    with raises(ArtifactError, match=r"sae is malformed .*size mismatch"):
        tlm.sae.load(sae)


def test_artifacts_of_another_model_are_refused(world, tmp_path):
    with raises(ValueError, match="belongs to another model"):
        Compression.load(world.root / "compression", world.other)
    other_comp = tlm.compress(world.other, world.data, progress=False)
    with raises(ValueError, match="another model"):
        ChannelGraph.load(world.root / "graph", compression=other_comp)
    wide = tiny_model("gpt2", seed=0, d_model=24, d_head=6)
    with raises(ValueError, match="trained on another model"):
        tlm.sae.load(world.root / "sae", model=wide)
    toy = tmp_path / "toy"
    shutil.copytree(world.root / "toy", toy)
    doc = json.loads((toy / "config.json").read_text())
    (toy / "config.json").write_text(json.dumps({**doc, "vocab": doc["vocab"][:-1]}))
    with raises(ArtifactError, match="another toy vocabulary"):
        tlm.toy.load_model(toy)
    from tl_modular.training.trainer import TrainConfig, _load_checkpoint

    m = tiny_model("gpt2", seed=0)
    with raises(ValueError, match="checkpoint of a different run"):
        _load_checkpoint(world.root / "train_state.safetensors", m, torch.optim.AdamW(m.parameters()),
                         torch.Generator(), TrainConfig(steps=1, lr=0.5))
    from tl_modular.training import BuildConfig
    from tl_modular.training.build_state import _resume

    with raises(ValueError, match="other settings"):
        _resume(world.root / "build", BuildConfig(lr=0.5), tiny_model("gpt2", seed=0))


def test_report_directory_with_a_damaged_manifest_runs_again(tmp_path, capsys):
    from tl_modular.report.pipeline import _Stages

    (tmp_path / "manifest.json").write_bytes(b'{"key": "k", "stages": {"graph": {"se')
    tried()
    stages = _Stages(tmp_path, "k", reuse=True, progress=True)
    assert stages.done == {}
    assert "manifest.json is not valid JSON" in capsys.readouterr().out
    (tmp_path / "manifest.json").write_text('{"key": "k", "stages": {"graph": {}}}')
    stages = _Stages(tmp_path, "k", reuse=True, progress=True)
    tried()
    (tmp_path / "graph.json").write_text("{")
    value = stages.run("graph", lambda: "computed", lambda: ChannelGraph.load(tmp_path))
    assert value == "computed" and "graph.json is not valid JSON" in capsys.readouterr().out


# --- arguments -----------------------------------------------------------------------------------

def test_more_modules_than_the_graph_can_give_names_the_maximum(world):
    most = len(world.graph.hierarchy()) + 1
    assert len(world.graph.modules(n_modules=most)) == most
    with raises(ValueError, match=rf"n_modules={most + 1} is more than this graph can give: at most {most} modules"):
        world.graph.modules(n_modules=most + 1)
    with raises(ValueError, match="n_modules=99 is more than this graph can give"):
        world.graph.modularity(n_modules=99, n_null=2, progress=False)
    n = len(world.graph._counted(False))                   # the channels the modules are made of
    for bad in (0, -1, n + 1):
        with raises(ValueError, match=rf"min_size must lie in 1\.\.{n}"):
            world.graph.modules(min_size=bad)


@pytest.mark.parametrize("call, match", [
    (lambda w: tlm.compress(w.model, w.data, batch_size=0, progress=False), "batch_size must be a positive"),
    (lambda w: tlm.build_graph(w.comp, model=w.model, tokens=w.data, batch_size=0, progress=False),
     "batch_size must be a positive"),
    (lambda w: w.comp.fidelity(w.model, w.data, batch_size=0), "batch_size must be a positive"),
    (lambda w: tlm.fidelity.rank_fidelity_curve(w.model, w.comp, w.data, [w.comp.max_total_rank + 1]),
     "exceed the .* dimensions this compression can give"),
    (lambda w: w.graph.modularity(n_null=1, progress=False), "n_null must be >= 2"),
    (lambda w: w.graph.check_routes(w.model, w.data, n=0), "n must be >= 1"),
    (lambda w: w.graph.circuits(w.model, {"all": w.data[:8]}, n_random=-1, progress=False), "n_random must be"),
    (lambda w: w.graph.circuits(w.model, {"none": w.data[:0]}, progress=False), r"\['none'\] hold no examples"),
    (lambda w: w.same.top_channels(-1), "n must be a non-negative integer"),
    (lambda w: w.same.top_routes(-2), "n must be a non-negative integer"),
    (lambda w: w.same.summary(-3), "n must be a non-negative integer"),
    (lambda w: tlm.segment(w.model).in_layer(7), r"no layer 7: this model's blocks are 0\.\.1"),
    (lambda w: tlm.label(tlm.labeling.neurons(w.model, 0, [0]), w.model, w.data, n_boot=-1, progress=False),
     "n_boot must be >= 0"),
    (lambda w: tlm.label(tlm.labeling.neurons(w.model, 0, [0]), w.model, w.data, on_error="ignore",
                         progress=False), "on_error must be"),
    (lambda w: w.comp.truncated(energy=1.5), "energy must lie in"),
    (lambda w: tlm.labeling.neurons(w.model, 0, [10_000]), "index 10000 is out of range"),
])
def test_arguments_beyond_what_the_model_or_graph_gives_are_errors(world, call, match):
    with raises(ValueError, match=match):
        call(world)
    assert count_hooks(world.model) == 0


def test_documented_clamps_say_how_many_they_gave(world):
    # a per-side rank above a side's maximum keeps the side whole (documented), never more
    full = world.comp.truncated(rank=10_000)
    assert full.total_rank == world.comp.max_total_rank
    assert world.comp.truncated(budget=world.comp.max_total_rank).total_rank == world.comp.max_total_rank


# --- token tensors (hypothesis) ------------------------------------------------------------------

@st.composite
def bad_tokens(draw):
    """A token tensor wrong in exactly one way: dtype, dimensions, range, length or emptiness."""
    kind = draw(st.sampled_from(["float", "bool", "ndim1", "ndim3", "negative", "too_big", "too_long", "empty"]))
    batch, pos = draw(st.integers(1, 4)), draw(st.integers(2, N_CTX))
    good = torch.randint(0, D_VOCAB, (batch, pos), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    i, j = draw(st.integers(0, batch - 1)), draw(st.integers(0, pos - 1))
    if kind == "float":
        return kind, good.float()
    if kind == "bool":
        return kind, good > 10
    if kind == "ndim1":
        return kind, good[0]
    if kind == "ndim3":
        return kind, good[None]
    if kind == "negative":
        good[i, j] = -draw(st.integers(1, 10**6))
        return kind, good
    if kind == "too_big":
        good[i, j] = D_VOCAB + draw(st.integers(0, 10**6))
        return kind, good
    if kind == "too_long":
        return kind, torch.randint(0, D_VOCAB, (batch, N_CTX + draw(st.integers(1, 40))))
    return kind, good[:0]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("gpt2", seed=0)
    data = torch.randint(0, D_VOCAB, (8, 10), generator=torch.Generator().manual_seed(0))
    comp = tlm.compress(model, data, progress=False)
    return model, comp, fingerprint(model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bad_tokens())
def test_bad_token_tensors_are_refused_by_compress_and_build_graph(tiny, case):
    model, comp, print_before = tiny
    kind, tokens = case
    tried(2)
    with pytest.raises((ValueError, TypeError)) as err:
        tlm.compress(model, tokens, progress=False)
    assert type(err.value) in (ValueError, TypeError) and str(err.value), kind
    with pytest.raises((ValueError, TypeError)):
        tlm.build_graph(comp, model=model, tokens=tokens, progress=False)
    assert count_hooks(model) == 0 and fingerprint(model) == print_before


@settings(max_examples=40, deadline=None)
@given(n_tokens=st.one_of(st.integers(-5, 0), st.floats(0.5, 9.5), st.just("12")),
       seq_len=st.one_of(st.integers(-3, 1), st.integers(N_CTX + 1, 10**6), st.just(4.0)))
def test_tokens_from_text_refuses_bad_sizes(gpt2_tokenizer, n_tokens, seq_len):
    model = SimpleNamespace(tokenizer=gpt2_tokenizer, cfg=SimpleNamespace(n_ctx=N_CTX, default_prepend_bos=True))
    tried()
    with pytest.raises((ValueError, TypeError), match="seq_len|n_tokens"):
        tlm.tokens_from_text(model, "some text " * 50, n_tokens, seq_len)


@settings(max_examples=10, deadline=None)
@given(n_modules=st.integers(2, 200))
def test_n_modules_is_exact_or_an_error(world, n_modules):
    most = len(world.graph.hierarchy()) + 1
    tried()
    if n_modules <= most:
        assert len(world.graph.modules(n_modules=n_modules)) == n_modules
    else:
        with pytest.raises(ValueError, match=f"at most {most} modules"):
            world.graph.modules(n_modules=n_modules)
