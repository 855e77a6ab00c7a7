"""Faults, tried on purpose: the labeling test server's every fault mode through ``tlm.label`` and
``tl-modular analyze`` (what stops at once, what is kept and resumable), with a unique API key in the
environment and inside the URL that must appear in no byte printed, logged, warned or written; two
real processes labeling into one cache; the CLI's user errors (exit 2, one message, no traceback
unless --debug) and Ctrl-C in the middle of ``analyze`` (exit 130, the stages done reused).

No test touches the internet: the server runs on 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path

import pytest
import torch
from _bad import raises, tried

import tl_modular as tlm
from tl_modular import cli, labeling, report
from tl_modular.errors import LabelingError
from tl_modular.labeling._client import ClientConfig
from tl_modular.labeling.testing_server import ChatServer, Fault
from tl_modular.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: threads only contend
KEY = f"sk-tlmtest-{uuid.uuid4().hex}"          # unique: any occurrence anywhere is a leak
UNITS = 4


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("gpt2", seed=0)
    tokens = torch.randint(0, 50, (16, 10), generator=torch.Generator().manual_seed(0))
    return model, tokens, labeling.neurons(model, 0, list(range(UNITS)))


@pytest.fixture()
def leaks(monkeypatch, caplog, capfd, tmp_path):
    """Everything printed, logged and warned while a test runs, and every file under tmp_path,
    checked for the key at the end (the key is also in $OPENAI_API_KEY)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)                  # openai's and httpx's own debug logs included
    seen: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield seen
    out, err = capfd.readouterr()
    texts = [*seen, out, err, caplog.text, *(str(w.message) for w in caught)]
    texts += [r.getMessage() for r in caplog.records]
    for i, text in enumerate(texts):
        assert KEY not in text, f"the key leaked into output #{i}: ...{text[max(0, text.find(KEY) - 200):][:400]}"
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    for f in files:
        assert KEY.encode() not in f.read_bytes(), f"the key leaked into {f}"


def _seen(seen: list[str], *objs) -> None:
    """Record what a user would look at: reprs, messages, tracebacks."""
    for o in objs:
        seen.append(repr(o))
        seen.append(str(o))
        if isinstance(o, BaseException):
            seen.append("".join(traceback.format_exception(o)))


def _url(server: ChatServer, creds: bool = True, scheme: str = "http") -> str:
    port = server.url.split(":")[2].split("/")[0]
    return f"{scheme}://{'user:' + KEY + '@' if creds else ''}127.0.0.1:{port}/v1"


def _labeler(url: str, cache: Path, **cfg) -> tlm.OpenAILabeler:
    cfg = {"model": "stand-in", "base_url": url, "cache_dir": cache, "max_retries": 2, "backoff_s": 0.001,
           "max_backoff_s": 0.05, "timeout_s": 3.0, "max_concurrency": 2, **cfg}
    return tlm.OpenAILabeler(config=ClientConfig(**cfg))


def _explain(unit: str):
    """Matches the requests for ``unit``'s explanation (its repair request too)."""
    return lambda body: any(f"Explain unit {unit} " in str(m.get("content")) for m in body["messages"])


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- tlm.label: the fault modes --------------------------------------------------------------------

def test_labeling_succeeds_with_the_key_in_the_url_and_the_environment(tiny, leaks, tmp_path):
    model, tokens, units = tiny
    with ChatServer(labeling.offline_chat_model, api_key=KEY) as server:
        labeler = _labeler(_url(server), tmp_path / "cache")
        labels = tlm.label(units, model, tokens, labeler=labeler, n_baseline=2, n_boot=5, progress=False)
    assert all(lab.ok for lab in labels) and labels.failures() == {}
    labels.save(tmp_path / "labels.json")
    _seen(leaks, labels, labeler, labeler.config, labeler.client, labels.config, labels.to_markdown())
    assert "***@127.0.0.1" in labels.config["labeler"]          # the endpoint is shown, its credentials are not


def test_a_server_echoing_the_key_in_its_answers_does_not_get_it_written(tiny, leaks, tmp_path):
    model, tokens, units = tiny

    def respond(body):
        answer = json.loads(labeling.offline_chat_model(body))
        if "label" in answer:
            answer["label"] = f"fires on {KEY} and on {answer['label']}"
        return json.dumps(answer)
    with ChatServer(respond, api_key=KEY) as server:
        labels = tlm.label(units, model, tokens, labeler=_labeler(_url(server), tmp_path / "cache"), n_baseline=0,
                           n_boot=5, progress=False)
    tried()
    saved = json.loads(labels.save(tmp_path / "labels.json").read_text())
    assert all(lab["text"].startswith("fires on *** and on") for lab in saved["labels"])
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2 * UNITS     # cached, the key masked (leaks checks)


@pytest.mark.parametrize("mode", ["401", "403", "404 model", "404 route", "400 x3", "unreachable", "tls", "no key"])
def test_labeling_that_cannot_label_stops_at_once_naming_reason_and_endpoint(tiny, leaks, tmp_path, mode,
                                                                              monkeypatch):
    model, tokens, units = tiny
    reason = {"401": "auth", "403": "auth", "404 model": "not_found", "404 route": "not_found", "400 x3": "refused",
              "unreachable": "unreachable", "tls": "unreachable", "no key": "no_key"}[mode]
    server_kw = {"401": {"api_key": "another-key-0123456789"}, "404 model": {"models": ["a-real-model"]}}.get(mode, {})
    respond = labeling.offline_chat_model
    if mode == "403":
        respond = lambda body: Fault(status=403)                # noqa: E731
    if mode == "400 x3":
        respond = lambda body: Fault(status=400, body='{"error": {"message": "response_format is not supported"}}')  # noqa: E731
    with ChatServer(respond, **server_kw) as server:
        url = _url(server)
        if mode == "404 route":
            url += "/nowhere"
        if mode == "unreachable":
            url = f"http://user:{KEY}@127.0.0.1:{_closed_port()}/v1"
        if mode == "tls":                                      # https to a plain-HTTP server: the handshake fails
            url = _url(server, scheme="https")
        if mode == "no key":
            monkeypatch.delenv("OPENAI_API_KEY")
            url = _url(server, creds=False)
        labeler = _labeler(url, tmp_path / "cache", max_concurrency=1)
        tried()
        with pytest.raises(LabelingError) as err:
            tlm.label(units, model, tokens, labeler=labeler, n_baseline=0, n_boot=5, progress=False)
        sent = len(server.requests)
    e = err.value
    _seen(leaks, e, e.labels, labeler)
    assert e.reason == reason, str(e)
    assert e.endpoint is not None and "127.0.0.1" in e.endpoint and "127.0.0.1" in str(e)
    # settled by the first answers: units not yet asked are never sent, no batch of retries is spent
    assert sent <= 3, sent
    assert e.labels is not None and sum(lab.ok for lab in e.labels) == 0
    if e.labels:
        e.labels.save(tmp_path / "partial.json")


@pytest.mark.parametrize("mode, reason", [
    ("500", "server_error"), ("429", "rate_limited"), ("timeout", "timeout"), ("malformed", "invalid_answer"),
])
def test_transient_failures_keep_the_rest_warn_and_resume(tiny, leaks, tmp_path, mode, reason):
    model, tokens, units = tiny
    target = units[1].name
    fault = {"500": Fault(status=500), "429": Fault(status=429, retry_after=0.01),
             "timeout": Fault(delay_s=1.0, malformed='{"label": "late", "negative_label": ""}'),
             "malformed": Fault(malformed="{not json")}[mode]
    # every attempt (first + 2 retries, or the repair) of one unit's explanation fails
    faults = [Fault(**{**fault.__dict__, "when": _explain(target)}) for _ in range(3)]
    cfg = {"timeout_s": 0.5} if mode == "timeout" else {}
    with ChatServer(labeling.offline_chat_model, faults=faults, api_key=KEY) as server:
        tried()
        with pytest.warns(RuntimeWarning, match=rf"1 of {UNITS} units could not be labeled \(1 "):
            labels = tlm.label(units, model, tokens, labeler=_labeler(_url(server), tmp_path / "cache", **cfg),
                               n_baseline=0, n_boot=5, progress=False)
        assert labels.failures() == {reason: 1} and not labels[target].ok and labels[target].failure == reason
        assert sum(lab.ok for lab in labels) == UNITS - 1
        assert f"not labeled: 1 {labeling._client.REASONS[reason]}" in repr(labels)
        path = labels.save(tmp_path / "labels.json")
        assert tlm.labeling.Labels.load(path).failures() == {reason: 1}
        server.faults.clear()                              # the server is well again
        before = len(server.requests)
        # resumed with the same cache: only the failed unit is asked again
        again = tlm.label(units, model, tokens, labeler=_labeler(_url(server), tmp_path / "cache", **cfg),
                          n_baseline=0, n_boot=5, progress=False)
        assert all(lab.ok for lab in again) and 1 <= len(server.requests) - before <= 2
        # on_error="raise": the same failure raises, with the partial labels attached
        server.faults[:] = [Fault(**{**fault.__dict__, "when": _explain(target)}) for _ in range(3)]
        with pytest.raises(LabelingError, match=f"1 of {UNITS} units could not be labeled") as err:
            tlm.label(units, model, tokens, labeler=_labeler(_url(server), tmp_path / "other", **cfg),
                      n_baseline=0, n_boot=5, progress=False, on_error="raise")
        assert err.value.reason == "failures" and err.value.labels.failures() == {reason: 1}
    _seen(leaks, labels, again, err.value)


# --- two processes, one cache ------------------------------------------------------------------------

_CHILD_LABEL = """
import json, sys, torch
import tl_modular as tlm
from tl_modular.labeling._client import ClientConfig
from tl_modular.testing import tiny_model
model = tiny_model("gpt2", seed=0)
tokens = torch.randint(0, 50, (16, 10), generator=torch.Generator().manual_seed(0))
units = tlm.labeling.neurons(model, 0, list(range(12)))
cfg = ClientConfig(model="stand-in", base_url=sys.argv[1], api_key="none", cache_dir=sys.argv[2], max_concurrency=4)
labels = tlm.label(units, model, tokens, labeler=tlm.OpenAILabeler(config=cfg), n_baseline=0, n_boot=5,
                   progress=False)
labels.save(sys.argv[3])
print(json.dumps({"ok": sum(lab.ok for lab in labels), "n": len(labels), "requests": labels.usage.get("requests")}))
"""


def test_two_processes_labeling_into_one_cache_lose_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with ChatServer(labeling.offline_chat_model, latency_s=0.02) as server:
        procs = [subprocess.Popen([sys.executable, "-c", _CHILD_LABEL, server.url, str(cache),
                                   str(tmp_path / f"labels{i}.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env) for i in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err[-3000:]
        tried(2)
        counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
        assert all(c["ok"] == c["n"] == 12 for c in counts), counts
        entries = list(cache.rglob("*.json"))
        for f in entries:                                   # every entry whole, valid, of this format
            entry = json.loads(f.read_text())
            assert entry["version"] == 1 and entry["key"] == f.stem
        assert not list(cache.rglob("*.tmp"))
        a, b = (json.loads((tmp_path / f"labels{i}.json").read_text())["labels"] for i in range(2))
        assert [x["text"] for x in a] == [x["text"] for x in b]
        assert len(entries) == 24                          # one explanation and one simulation per unit
        # a third run is served whole from the shared cache
        model = tiny_model("gpt2", seed=0)
        tokens = torch.randint(0, 50, (16, 10), generator=torch.Generator().manual_seed(0))
        sent = len(server.requests)
        third = tlm.label(labeling.neurons(model, 0, list(range(12))), model, tokens, n_baseline=0, n_boot=5,
                          labeler=_labeler(server.url, cache, api_key="none"), progress=False)
        assert len(server.requests) == sent and all(lab.ok for lab in third)


# --- the CLI -------------------------------------------------------------------------------------------

def _tiny_inputs(labeler=None, simulator=None, device="cpu", **_):
    model = tiny_model("gpt2", seed=0).to(device)
    tokens = torch.randint(0, 50, (24, 10), generator=torch.Generator().manual_seed(0))
    return report.Inputs(model=model, tokens=tokens, name="tiny", categories={"all": tokens[:16]},
                         labeler=labeler, simulator=simulator)


_SMALL = {"n_null": 2, "budgets": 2, "n_boot": 5, "n_random": 1, "batch_size": 8, "n_label_units": 4}


@pytest.fixture()
def small_cli(monkeypatch):
    """`tl-modular analyze` on a tiny model with small settings (the bundled model takes minutes)."""
    monkeypatch.setattr(report, "bundled_inputs", _tiny_inputs)
    monkeypatch.setattr(report, "AnalyzeConfig", functools.partial(report.AnalyzeConfig, **_SMALL))


def _first_unit_explanations():
    """A ``when=`` matching the explanation requests of the first unit explained (and no other)."""
    first: dict[str, str] = {}

    def when(body):
        text = str(body["messages"][1].get("content"))
        if not text.startswith("Explain unit "):
            return False
        return first.setdefault("unit", text.split()[2]) == text.split()[2]
    return when


def test_cli_labeling_flow_keeps_the_key_secret(small_cli, leaks, tmp_path, capfd, monkeypatch):
    out = tmp_path / "report"
    monkeypatch.setattr("tl_modular.labeling._client.random.uniform", lambda a, b: 0.0)   # retries without waiting
    with ChatServer(labeling.offline_chat_model, api_key="another-key-0123456789") as server:
        argv = ["analyze", "--labeler", "openai", "--llm-model", "stand-in", "--base-url", _url(server),
                "--out", str(out), "--quiet"]
        # a key the server refuses: exit 2, the reason and the endpoint, no key (with and without --debug)
        for debug in ([], ["--debug"]):
            tried()
            assert cli.main([*argv, *debug]) == 2
            err = capfd.readouterr().err
            leaks.append(err)
            assert "HTTP 401" in err and "http://***@127.0.0.1" in err and ("Traceback" in err) == bool(debug), err
            assert "the stages finished so far (compression" in err
        # a server that fails one unit for good: the report is written, the failure said and kept
        server.api_key = KEY
        first_unit = _first_unit_explanations()
        # enough 500s that every explanation request of that unit fails all its 7 attempts, however
        # its requests interleave; what is left is cleared after the run
        server.faults.extend(Fault(status=500, when=first_unit) for _ in range(28))
        before_partial = len(server.requests)
        tried()
        assert cli.main(argv) == 0
        err = capfd.readouterr().err
        leaks.append(err)
        assert err.count("tl-modular: warning: 1 of 4 units could not be labeled (1 server error)") == 1
        rows = json.loads((out / "summary.json").read_text())["labels"]["labels"]
        assert sum(r["status"] != "ok" for r in rows) == 1
        failed_requests = 28 - len(server.faults)
        server.faults.clear()
        # the same command once the server is well: the stages are reused, only what is missing is asked (the
        # failed unit, the module whose evidence holds its label, new baseline draws), not the whole run again
        sent = len(server.requests)
        fresh = sent - before_partial - failed_requests
        assert cli.main(argv) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert all(r["status"] == "ok" for r in summary["labels"]["labels"]) and "graph" in summary["reused"]
        assert 2 <= len(server.requests) - sent < fresh
    with ChatServer(labeling.offline_chat_model) as gone:
        url = _url(gone)
    tried()
    assert cli.main(["analyze", "--labeler", "openai", "--llm-model", "stand-in", "--base-url", url, "--out",
                     str(tmp_path / "gone"), "--quiet"]) == 2
    err = capfd.readouterr().err
    leaks.append(err)
    assert "cannot reach the server at http://***@127.0.0.1" in err and "are saved in" in err


@pytest.mark.parametrize("argv, message", [
    (["analyze", "--sae", "gpt2-small-res-jb:blocks.0.hook_resid_pre"], "--sae does not apply to the bundled model"),
    (["analyze", "--circuits", "ioi"], "--circuits does not apply to the bundled model"),
    (["analyze", "--tokens", "100"], "--tokens does not apply to the bundled model"),
    (["analyze", "--seq-len", "64"], "--seq-len does not apply to the bundled model"),
    (["analyze", "--base-url", "http://127.0.0.1:9/v1"], "--base-url applies only with --labeler openai"),
    (["analyze", "--llm-budget", "1"], "--llm-budget applies only with --labeler openai"),
    (["analyze", "--labeler", "openai", "--llm-concurrency", "0", "--base-url", "http://x/v1"], "at least 1"),
    (["analyze", "--labeler", "openai", "--api-key-env", "TLM_NO_SUCH_VAR"], "needs an API key in $TLM_NO_SUCH_VAR"),
    (["analyze", "--device", "cuda:99"], "--device cuda:99 is not available on this machine (available: cpu"),
    (["analyze", "--device", "toaster"], "--device 'toaster' is not a device name; available here: cpu"),
    (["analyze", "--model", "gpt2", "--data", "no/such/file.txt"], "no such file"),
    (["analyze", "--model", "gpt2", "--data", "."], "is a directory"),
    (["diff", "no_such_dir_a", "no_such_dir_b"], "no such directory"),
])
def test_cli_user_errors_exit_2_with_one_message(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_check_hub", lambda name: pytest.fail("the hub was contacted before the check"))
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("a model was loaded before the check"))
    monkeypatch.delenv("TLM_NO_SUCH_VAR", raising=False)
    tried()
    assert cli.main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "analyze" else [])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("tl-modular: error:") == 1 and "Traceback" not in err


def test_cli_out_and_report_directories(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for out, message in ((afile, "is a file, not a directory"), (afile / "sub", "cannot be created")):
        tried()
        assert cli.main(["analyze", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    unwritable = locked if not os.access(locked, os.W_OK) else Path("/sys/tl_modular_test_out")  # root: /sys
    if unwritable.parent.exists():
        tried()
        assert cli.main(["analyze", "--out", str(unwritable)]) == 2
        assert "--out" in capsys.readouterr().err
    locked.chmod(0o700)
    # diff: a folder that is not a report, and a report whose graph.json is damaged
    (tmp_path / "empty").mkdir()
    tried(2)
    assert cli.main(["diff", str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    assert "not a report directory (no graph.json)" in capsys.readouterr().err
    (tmp_path / "empty" / "graph.json").write_text('{"schema": "tl_modular.ChannelGraph", "version": 1, "nodes": [')
    assert cli.main(["diff", str(tmp_path / "empty"), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "graph.json is not valid JSON" in err and "Traceback" not in err


def test_cli_internal_errors_exit_1_and_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    def boom(args):
        raise RuntimeError("something broke inside")
    monkeypatch.setattr(cli, "_analyze", boom)
    assert cli.main(["analyze", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something broke inside" in err and "--debug" in err
    assert "Traceback" not in err
    assert cli.main(["analyze", "--debug", "--out", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert cli.main(["--debug", "analyze", "--out", str(tmp_path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def _ctrl_c_reaches() -> None:
    """In the child before exec: SIGINT as in a terminal. A shell without job control starts
    background commands (``.ci/run &``) with SIGINT ignored, children inherit that, and Python then
    installs no KeyboardInterrupt handler: Ctrl-C could not reach the child at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_CHILD_ANALYZE = """
import functools, sys
sys.path.insert(0, {tests!r})
from tl_modular import cli, report
import test_faults
report.bundled_inputs = test_faults._tiny_inputs
report.AnalyzeConfig = functools.partial(report.AnalyzeConfig, **test_faults._SMALL)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_during_analyze_exits_130_and_the_stages_done_are_reused(small_cli, tmp_path, capsys):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    script = _CHILD_ANALYZE.format(tests=str(ROOT / "tests"))
    with ChatServer(labeling.offline_chat_model, latency_s=120) as server:     # labels wait: interrupt there
        argv = ["analyze", "--labeler", "openai", "--base-url", server.url, "--out", str(out), "--quiet"]
        child = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ctrl_c_reaches)
        deadline = time.monotonic() + 300
        while not server.requests and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.requests, child.communicate()[1][-3000:]
        child.send_signal(signal.SIGINT)
        tried()
        try:
            _, err = child.communicate(timeout=180)
        except subprocess.TimeoutExpired:       # hung after Ctrl-C: show where (faulthandler dumps on SIGABRT)
            child.send_signal(signal.SIGABRT)
            _, err = child.communicate(timeout=60)
            raise AssertionError(f"analyze did not stop within 180 s of Ctrl-C; its threads:\n{err[-6000:]}") from None
        assert child.returncode == 130, err[-3000:]
        assert "Traceback" not in err and "tl-modular: interrupted; the stages finished so far (compression" in err
        assert f"({out} is left as it was)" in err      # the stages are beside it, in the staging folder
        from tl_modular.report.pipeline import staging_dir
        manifest = json.loads((staging_dir(out) / "manifest.json").read_text())
        assert {"compression", "graph", "modules", "circuits"} <= set(manifest["stages"])
        assert "labels" not in manifest["stages"]
        # the same command again (in this process; the server now answers at once) reuses what was done
        server.latency_s = 0
        assert cli.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"compression", "graph", "modules", "circuits"} <= set(summary["reused"])
    assert "labels" not in summary["reused"] and all(r["status"] == "ok" for r in summary["labels"]["labels"])
    tlm.ChannelGraph.load(out)


def test_no_key_is_a_usage_error_before_anything_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args = cli._parser().parse_args(["analyze", "--labeler", "openai", "--out", str(tmp_path)])
    cli._check_options(args)
    with raises(cli.UsageError, match=r"needs an API key in \$OPENAI_API_KEY"):
        cli._labeler(args)


def test_a_failed_model_load_leaves_no_empty_report_directory(monkeypatch, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world")

    def unknown(name, device):
        raise cli.UsageError(f"{name!r} is not a TransformerLens model name")
    monkeypatch.setattr(cli, "_check_hub", lambda name: None)
    monkeypatch.setattr(cli, "_load_model", unknown)
    tried()
    assert cli.main(["analyze", "--model", "nope", "--data", str(text), "--out", str(tmp_path / "o")]) == 2
    assert "is not a TransformerLens model name" in capsys.readouterr().err and not (tmp_path / "o").exists()


_CHILD_STUBBORN = """
import asyncio, sys, time
from tl_modular._aio import run_sync

async def stubborn():                       # absorbs its cancellation, as a retrying HTTP request can
    while True:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            continue

async def main():
    print("ready", flush=True)
    await asyncio.gather(stubborn(), stubborn())

start = time.monotonic()
try:
    run_sync(main())
except KeyboardInterrupt:
    print(f"interrupted after {time.monotonic() - start:.1f} s", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_ends_async_work_even_when_a_task_ignores_its_cancellation():
    """``asyncio.run`` cancels only the main task and waits for it: a task that absorbs the
    cancellation hung ``tl-modular analyze`` in its labeling stage after Ctrl-C (seen in CI)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD_STUBBORN], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ctrl_c_reaches)
    assert child.stdout.readline().strip() == "ready"
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    tried()
    try:
        out, err = child.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        raise AssertionError("Ctrl-C did not end the run") from None
    assert child.returncode == 130, err[-2000:]
    assert "interrupted after" in out and time.monotonic() - sent < 60
