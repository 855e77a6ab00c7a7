"""Data-parallel passes under torch.distributed: two spawned gloo ranks equal one process.

One spawn of two CPU processes runs every pass (statistics closed-form and matrix-free, Fisher,
compression, graph data strengths, fidelity, route checks and lesions by ablation, circuit
scores, evidence and labels) on 13 rows in batches of 5 — uneven shards (rank 0 one batch,
rank 1 two) — and on 3 rows in one batch (rank 0 gets none); then each rank feeds another model,
other tokens and another token shape, and every rank must raise the clear mismatch error. The
parent compares each rank's results with the same calls in one process.

Tolerances: sums are all-reduced in float64, so statistics and strengths equal the single
process to fp64 rounding of a different summation order (1e-9 relative asked; at most 1.6e-14
seen, on compression projectors after the eigendecompositions);
per-example results (circuit scores, evidence rows, labels) are computed by the same batches and
must be identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import tl_modular as tlm
from tl_modular import _dist
from tl_modular.compression.fisher import collect_fisher
from tl_modular.compression.statistics import collect_statistics
from tl_modular.sae._attach import collect
from tl_modular.testing import tiny_model

BATCH = 5


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """13 rows (3 batches of 5: uneven over 2 ranks) and 3 rows (1 batch: rank 0 gets none)."""
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 50, (13, 10), generator=gen), torch.randint(0, 50, (3, 10), generator=gen)


def _stats(stats) -> dict[str, torch.Tensor]:
    out = {"n_tokens": torch.tensor(float(stats.n_tokens))}
    for h, s in stats.inputs.items():
        out[f"in:{h}:mean"], out[f"in:{h}:cov"] = s.mean, s.cov
    for c, ports in stats.reads.items():
        for p, s in ports.items():
            if s.jacobian is not None:
                out[f"read:{c}:{p}"] = s.jacobian
    for c, w in stats.writes.items():
        out[f"write:{c}:mean"], out[f"write:{c}:cov"] = w.mean, w.cov
        if w.jacobian is not None:
            out[f"write:{c}:jac"] = w.jacobian
    return out


def _comp(comp) -> dict[str, torch.Tensor]:
    """Spectra and projectors (eigenvector signs are arbitrary; projectors are not)."""
    out = {}
    for name in comp:
        for key, side in comp[name].sides.items():
            out[f"{name}:{key}:spectrum"] = side.spectrum.double()
            out[f"{name}:{key}:proj"] = (side.decoder @ side.encoder.T).double()
    return out


def _passes(model, data, small, comp, units) -> dict[str, object]:
    """Every data-parallel pass; the same calls make the single-process reference."""
    res: dict[str, object] = {}
    res["stats"] = _stats(collect_statistics(model, data, batch_size=BATCH, progress=False))
    res["stats_mf"] = _stats(collect_statistics(model, data, batch_size=BATCH, method="matrix_free", progress=False))
    res["stats_one_batch"] = _stats(collect_statistics(model, small, batch_size=4, progress=False))
    fisher = collect_fisher(model, data, batch_size=BATCH, moments=True, progress=False)
    res["fisher"] = {**{f"w:{k}": v for k, v in fisher.writes.items()},
                     **{f"p:{c}:{p}": v for (c, p), v in fisher.ports.items()}, **_stats(fisher.statistics)}
    res["comp"] = _comp(tlm.compress(model, data, batch_size=BATCH, progress=False))
    graph = tlm.build_graph(comp, model=model, tokens=data, batch_size=BATCH, progress=False)
    res["graph"] = {f"{u}->{v}": torch.tensor([d["attribution"], d["data"]], dtype=torch.float64)
                    for u, v, d in graph.nx.edges(data=True) if d.get("kind") == "route"}
    res["graph_one_batch"] = {
        f"{u}->{v}": torch.tensor([d["attribution"], d["data"]], dtype=torch.float64)
        for u, v, d in tlm.build_graph(comp, model=model, tokens=small, batch_size=4, progress=False
                                       ).nx.edges(data=True) if d.get("kind") == "route"}
    res["fidelity"] = comp.fidelity(model, data, batch_size=BATCH)
    # graph checks against real ablation: per-batch loss changes, summed over the ranks' shards
    res["check_routes"] = graph.check_routes(model, data, n=6, batch_size=BATCH)
    res["check_routes_one_batch"] = graph.check_routes(model, small, n=6, batch_size=4)
    members = sorted(set().union(*graph.modules()))
    by_layer = [frozenset(n for n in members if n.startswith(f"L{i}.")) for i in range(2)]
    res["lesion"] = graph.lesion(model, data, modules=by_layer, n_random=2, batch_size=BATCH)
    res["lesion_one_module"] = graph.lesion(model, data, n_random=1, batch_size=BATCH)       # no route: zeros
    circuits = graph.circuits(model, {"data": data}, search="greedy", n_boot=5, n_random=1, batch_size=BATCH,
                              progress=False)
    c = circuits["data"]
    res["circuits"] = {"scores": c.scores, "routes": c.routes, "faithfulness": c.faithfulness,
                       "usage": np.asarray(c.usage)}
    ev = tlm.labeling.collect_evidence(units(model), model, data, config=tlm.labeling.EvidenceConfig(batch_size=BATCH),
                                       progress=False)
    res["evidence"] = {n: (e.stats, [(x.row, x.acts) for x in e.top], [(x.row, x.acts) for x in e.holdout_random])
                       for n, e in ev.items()}
    labels = tlm.label(units(model), model, data, evidence=tlm.labeling.EvidenceConfig(batch_size=BATCH),
                       progress=False)
    res["labels"] = [(lab.unit, lab.text, lab.score) for lab in labels]
    # SAE activations (polysemanticity, unfolding): the batches up to max_tokens, split, in order
    res["sae_acts"] = collect(model, data, ["blocks.1.hook_resid_pre", "blocks.0.ln2.hook_normalized"],
                              batch_size=BATCH, max_tokens=70)
    return res


def _units(model):
    return tlm.labeling.neurons(model, 0, [0, 1, 2]) + tlm.labeling.channel_units(model, ["L0.H0", "L1.MLP"])


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_model("gpt2", seed=0)
        data, small = _data()
        comp = tlm.Compression.load(os.path.join(out, "comp"), model)
        res = _passes(model, data, small, comp, _units)
        res["world"] = (_dist.rank(), _dist.world_size(), _dist.is_main())
        errors = {}
        other = tiny_model("gpt2", seed=rank)                        # rank 1 holds another model
        for what, args in {"model": (other, data), "tokens": (model, data if rank == 0 else (data + 1) % 50),
                           "shape": (model, data if rank == 0 else data[:, :8])}.items():
            try:
                collect_statistics(*args, batch_size=BATCH, progress=False)
                errors[what] = None
            except _dist.DistributedMismatchError as e:
                errors[what] = str(e)
        res["errors"] = errors
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        torch.distributed.destroy_process_group()


def _close(a, b, path=""):
    """Equal to 1e-9 relative (tensors, floats) or exactly (everything else), recursively."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, (torch.Tensor, np.ndarray, float)) and not isinstance(a, bool):
        x, y = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b), dtype=torch.float64)
        assert x.shape == y.shape and torch.equal(x.isnan(), y.isnan()), f"{path}: {a!r} != {b!r}"
        x, y = x.nan_to_num(0.0), y.nan_to_num(0.0)          # NaN where both are (e.g. a ratio of no lesion)
        scale = max(float(x.abs().max()) if x.numel() else 0.0, 1e-300)
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert x.shape == y.shape and (err <= 1e-9 * scale or torch.equal(x, y)), f"{path}: {err:.3g} of {scale:.3g}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("dist")
    model = tiny_model("gpt2", seed=0)
    data, small = _data()
    comp = tlm.compress(model, data, batch_size=BATCH, progress=False)
    comp.save(out / "comp")
    comp = tlm.Compression.load(out / "comp", model)     # as the ranks read it
    ref = _passes(model, data, small, comp, _units)
    ctx = mp.spawn(_worker, args=(2, f"file://{out}/rendezvous", str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 600          # far beyond the ~30 s it takes: a hang fails, not blocks
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            errs = [f.read_text() for f in out.glob("rank*.err")]
            pytest.fail(f"the 2-rank run hung; {errs}")
    return ref, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("key", ["stats", "stats_mf", "stats_one_batch", "fisher", "comp", "graph", "graph_one_batch",
                                 "fidelity", "check_routes", "check_routes_one_batch", "lesion",
                                 "lesion_one_module", "circuits", "evidence", "labels", "sae_acts"])
def test_two_ranks_equal_one_process(two_ranks, key):
    ref, ranks = two_ranks
    for r, res in enumerate(ranks):
        assert res["world"] == (r, 2, r == 0)
        _close(ref[key], res[key], f"rank {r}: {key}")


def test_graph_strengths_are_not_trivially_equal(two_ranks):
    ref, _ = two_ranks
    values = torch.stack(list(ref["graph"].values()))
    assert values.abs().sum() > 0 and len(values) > 10


def test_ablation_effects_are_not_trivially_equal(two_ranks):
    ref, _ = two_ranks
    for key in ("check_routes", "check_routes_one_batch"):
        assert len(ref[key]["actual"]) == 6 and min(abs(x) for x in ref[key]["actual"]) > 0, key
    assert ref["lesion"]["n_cross_routes"] > 0 and ref["lesion"]["cross"] != 0 and all(ref["lesion"]["random"])
    assert ref["lesion_one_module"]["cross"] == 0.0 and ref["lesion_one_module"]["random"] == [0.0]


@pytest.mark.parametrize("what", ["model", "tokens", "shape"])
def test_ranks_that_disagree_fail_with_a_clear_error(two_ranks, what):
    _, ranks = two_ranks
    for res in ranks:             # every rank raises (none waits in a collective)
        message = res["errors"][what]
        assert message is not None, what
        assert "collect_statistics: the ranks of the process group disagree on" in message
        assert ("model" if what == "model" else "tokens") in message.split("(rank 0")[0]


def test_shards_are_contiguous_uneven_and_may_be_empty(monkeypatch):
    got = {}
    for r in range(3):
        monkeypatch.setattr(_dist, "rank", lambda r=r: r)
        monkeypatch.setattr(_dist, "world_size", lambda: 3)
        got[r] = _dist.batch_starts(9, 4)                     # 3 batches over 3 ranks
        got[("few", r)] = _dist.shard([0, 4])                  # 2 batches over 3 ranks
    assert [got[r] for r in range(3)] == [[0], [4], [8]]
    assert [got[("few", r)] for r in range(3)] == [[], [0], [4]]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _dist.batch_starts(9, 0)


def test_without_a_process_group_everything_is_local():
    assert not _dist.active() and _dist.rank() == 0 and _dist.world_size() == 1 and _dist.is_main()
    total = _dist.all_reduce_sum({"a": torch.ones(2), "n": 3.0})
    assert total["a"].tolist() == [1.0, 1.0] and total["n"] == 3.0
    assert _dist.gather_batches([np.ones(2)])[0].tolist() == [1.0, 1.0]
    assert _dist.on_main(lambda: 7) == 7 and _dist.broadcast_object("x") == "x"
    _dist.check_consistent("nothing", None)


@pytest.mark.slow
def test_analyze_with_two_processes_writes_the_one_process_report(tmp_path):
    """``tl-modular analyze --nproc 2`` (torchrun, gloo): the same report as one process; only rank 0
    writes. Floats computed by fp32 forwards under bases that differ at 1e-14 agree to ~1e-7."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "tl_modular", "analyze", "--quiet", "--out", str(tmp_path / name),
                               *extra], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("one", "two"))
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())

    def same(x, y, path):
        if isinstance(x, dict):
            assert sorted(x) == sorted(y), path
            for k in x:
                same(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, list):
            assert len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y, strict=True)):
                same(u, v, f"{path}[{i}]")
        elif isinstance(x, float):
            assert x == pytest.approx(y, rel=1e-6, nan_ok=True), path
        else:
            assert x == y, path

    for key in ("compression", "rank_fidelity", "modules", "circuits", "polysemanticity", "labels"):
        same(a[key], b[key], key)


def test_nproc_must_be_positive(capsys):
    from tl_modular.cli import main

    assert main(["analyze", "--nproc", "0", "--out", "unused"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err


def _analyze_cli(out, *extra: str, die: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m tl_modular analyze --quiet --out OUT ...``; ``die="RANK:STAGE[:STATUS]"`` makes that
    rank exit where that stage begins (the test hook of :func:`tl_modular._dist.exit_if_asked`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(_dist.TEST_EXIT_ENV, None)
    if die is not None:
        env[_dist.TEST_EXIT_ENV] = die
    return subprocess.run([sys.executable, "-m", "tl_modular", "analyze", "--quiet", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=900)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rank_that_dies_fails_the_run_naming_it(tmp_path):
    """Rank 1 exits (status 5) as the first stage begins: the run exits 5 naming rank 1, rank 0 says
    why it stopped (not an internal error), and the fresh --out is not left behind."""
    out = tmp_path / "report"
    done = _analyze_cli(out, "--nproc", "2", die="1:compression:5")
    assert done.returncode == 5, done.stderr[-3000:]
    err = done.stderr
    assert "tl-modular: the 2-process run failed: rank 1 exited with status 5 (see its message above)" in err
    assert "rank 0 of 2: stopped: another rank of the run failed (" in err
    assert "internal error" not in err and "please report" not in err and "Traceback" not in err
    assert "no stage was finished" in err
    assert not out.exists() and not (tmp_path / ".report.partial").exists()


@pytest.mark.slow
def test_after_a_rank_dies_the_rerun_reuses_the_finished_stages(tmp_path):
    """Rank 1 dies at the graph stage: the stages before it are saved and the same command reuses
    them; then rank 0 dies (status 9) in a --no-reuse run over that report, which stays byte-identical."""
    import json

    out = tmp_path / "report"
    failed = _analyze_cli(out, "--nproc", "2", die="1:graph")
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "the 2-process run failed: rank 1 exited with status 1" in failed.stderr
    assert "the stages finished so far (compression, rank_fidelity) are saved in" in failed.stderr
    assert not out.exists()

    again = _analyze_cli(out, "--nproc", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"compression", "rank_fidelity"} <= set(summary["reused"]) and "graph" not in summary["reused"]

    before = _files(out)
    failed = _analyze_cli(out, "--nproc", "2", "--no-reuse", die="0:labels:9")
    assert failed.returncode == 9, failed.stderr[-3000:]
    assert "the 2-process run failed: rank 0 exited with status 9" in failed.stderr
    assert "internal error" not in failed.stderr
    assert _files(out) == before


@pytest.mark.slow
def test_ctrl_c_stops_the_ranks_and_exits_130(tmp_path):
    import signal

    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(_dist.TEST_EXIT_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "tl_modular", "analyze", "--quiet", "--nproc", "2",
                             "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / ".report.partial").exists():         # the ranks are running
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "tl-modular: interrupted" in err and "internal error" not in err


class _Failure:
    def __init__(self, exitcode: int, timestamp: int = 0):
        self.exitcode, self.timestamp = exitcode, timestamp

    def signal_name(self) -> str:
        import signal

        return signal.Signals(-self.exitcode).name if self.exitcode < 0 else "<N/A>"


class _Failed:
    """torchrun's ``ChildFailedError`` as :func:`tl_modular.cli._failed_ranks` reads it."""

    def __init__(self, failures: dict[int, _Failure]):
        self.failures = failures

    def get_first_failure(self):
        rank = min(self.failures, key=lambda r: self.failures[r].timestamp)
        return rank, self.failures[rank]


def test_the_failed_rank_is_the_one_that_did_not_stop_for_another():
    from tl_modular.cli import _failed_ranks

    # rank 2 was killed (e.g. out of memory); rank 0 stopped for it (3), rank 1 was stopped by torchrun (SIGTERM)
    message, status = _failed_ranks(_Failed({0: _Failure(3, 1), 1: _Failure(-15, 1), 2: _Failure(-9, 2)}), 3)
    assert message == ("the 3-process run failed: rank 2 was killed by SIGKILL (exit status -9) (see its message "
                       "above); the other ranks stopped with it") and status == 128 + 9
    # every rank failed alike (e.g. a bad argument seen by all): each is named, with the status
    message, status = _failed_ranks(_Failed({0: _Failure(2), 1: _Failure(2)}), 2)
    assert message == ("the 2-process run failed: rank 0 exited with status 2; rank 1 exited with status 2 "
                       "(see their messages above)") and status == 2
    # only ranks that stopped for another: the first failure torchrun saw
    message, status = _failed_ranks(_Failed({0: _Failure(3, 5), 1: _Failure(-15, 4)}), 2)
    assert message.startswith("the 2-process run failed: rank 1 was killed by SIGTERM") and status == 143


def test_the_test_hook_rejects_a_bad_spec(monkeypatch):
    monkeypatch.setenv(_dist.TEST_EXIT_ENV, "graph")
    with pytest.raises(ValueError, match="TL_MODULAR_TEST_RANK_EXIT='graph': expected RANK:STAGE"):
        _dist.exit_if_asked("graph")
    monkeypatch.setenv(_dist.TEST_EXIT_ENV, "1:graph")
    _dist.exit_if_asked("graph")                 # rank 0 here: goes on
