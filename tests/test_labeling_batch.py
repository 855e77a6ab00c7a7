"""Labeling through the OpenAI Batch API (``OpenAILabeler(batch=True)``) against the loopback server's
``/v1/files`` and ``/v1/batches``: the real ``openai`` client over real HTTP on 127.0.0.1.

The reference is the online path on the same scripted answers: the batch lines must be exactly the
online request bodies and the labels equal. Requests are counted at the server (online requests and
answered batch lines), so "no request paid twice" is a count, also across a killed process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from itertools import islice

import pytest

import tl_modular as tlm
from tl_modular import labeling
from tl_modular.labeling._batch import BatchQueue, _Job, poll_delays
from tl_modular.labeling._client import ChatClient, ClientConfig, LLMError, LLMUnavailable
from tl_modular.labeling.testing_server import BatchFault, ChatServer, Fault

KEY = "sk-test-BATCH-NEVER-STORE-91a7"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
          "additionalProperties": False}
FAST = {"batch_poll_s": 0.005, "batch_max_poll_s": 0.02, "batch_collect_s": 0.05, "backoff_s": 0.001,
        "max_backoff_s": 0.01, "max_retries": 3, "timeout_s": 10.0}


def _echo(body: dict) -> str:
    return json.dumps({"label": "says " + body["messages"][0]["content"]})


def _msgs(i: int) -> list[dict]:
    return [{"role": "user", "content": f"unit {i}"}]


def _client(server: ChatServer, cache, **cfg) -> ChatClient:
    return ChatClient(ClientConfig(**{"model": "stand-in", "base_url": server.url, "api_key": KEY, "cache_dir": cache,
                                      "batch": True, **FAST, **cfg}))


def _ask(client: ChatClient, idx) -> list:
    async def go():
        try:
            return await asyncio.gather(*(client.request(_msgs(i), SCHEMA, name="answer") for i in idx),
                                        return_exceptions=True)
        finally:
            await client.aclose()
    return asyncio.run(go())


def _posts(server: ChatServer, what: str) -> int:
    return sum(1 for m, p in server.calls if m == "POST" and p == what)


def _no_key_in(*roots) -> None:
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                assert KEY.encode() not in f.read_bytes(), f


def _canon(bodies) -> Counter:
    return Counter(json.dumps(b, sort_keys=True) for b in bodies)


# --- the whole labeling flow: batch == online ---------------------------------------------------------

@pytest.fixture(scope="module")
def toy():
    return tlm.toy.load_model()


@pytest.fixture(scope="module")
def toy_units(toy):
    tokens, mask, _ = tlm.toy.mixed_tokens(n_per_task=24, seed=3, scored=True)
    return labeling.neurons(toy, 0, [3, 8, 12, 20]), tokens, mask


def _label(toy, toy_units, server, cache, *, batch: bool, **cfg):
    units, tokens, mask = toy_units
    config = ClientConfig(model="stand-in", base_url=server.url, api_key=KEY, cache_dir=cache, batch=batch,
                          **{**FAST, **cfg})
    labeler = tlm.OpenAILabeler(config=config)
    return tlm.label(units, toy, tokens, attention_mask=mask, labeler=labeler, n_baseline=3, n_boot=20,
                     progress=False), labeler


@pytest.fixture(scope="module")
def online(toy, toy_units, tmp_path_factory):
    with ChatServer(labeling.offline_chat_model, api_key=KEY) as server:
        labels, _ = _label(toy, toy_units, server, tmp_path_factory.mktemp("online"), batch=False)
        return labels, list(server.requests)


def _same_labels(a, b) -> None:
    assert [x.unit for x in a] == [x.unit for x in b]
    for x, y in zip(a, b, strict=True):
        assert (x.text, x.negative_text, x.status) == (y.text, y.negative_text, y.status)
        assert x.score == pytest.approx(y.score, abs=1e-12) and x.detection == pytest.approx(y.detection, abs=1e-12)
    assert a.baseline == b.baseline


def test_batch_labels_equal_online_labels_and_a_rerun_asks_nothing(toy, toy_units, online, tmp_path):
    labels_online, bodies_online = online
    with ChatServer(labeling.offline_chat_model, api_key=KEY) as server:
        labels, labeler = _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        assert server.requests == []                                  # nothing online
        # the batch lines are exactly the online request bodies, each once
        assert _canon(server.batch_requests) == _canon(bodies_online)
        # explanations, then their simulations, then the random-label baseline: three batches
        assert _posts(server, "/batches") == 3 and _posts(server, "/files") == 3
        _same_labels(labels, labels_online)
        assert not any(KEY.encode() in f["content"] for f in server.files.values())     # uploads and outputs
        assert labels.usage["requests"] == len(bodies_online) == labels_online.usage["requests"]
        assert labels.usage["cost_usd"] == pytest.approx(labels_online.usage["cost_usd"] / 2, rel=1e-12)
        assert not list((tmp_path / "cache" / "batches").glob("*.json"))   # all answered and cached
        calls = len(server.calls)
        again, _ = _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        assert len(server.calls) == calls and again.usage.get("requests", 0) == 0   # from the cache: 0 requests
        _same_labels(again, labels)
        online_rerun, _ = _label(toy, toy_units, server, tmp_path / "cache", batch=False)   # the online path too
        assert len(server.calls) == calls
    assert "batch=True" in repr(labeler) and KEY not in repr(labeler) and KEY not in repr(labeler.client.batch)
    _no_key_in(tmp_path)


def test_a_run_stopped_while_polling_resumes_the_same_batch(toy, toy_units, online, tmp_path, monkeypatch):
    labels_online, bodies_online = online
    real = BatchQueue._retrieve

    async def dies_on_the_second_batch(self, batch_id):      # the process "dies" once the simulations are submitted
        if len(self.created) == 2:
            raise RuntimeError("killed while polling")
        return await real(self, batch_id)

    faults = [BatchFault(), BatchFault(polls=2)]
    with ChatServer(labeling.offline_chat_model, api_key=KEY, batch_faults=faults) as server:
        monkeypatch.setattr(BatchQueue, "_retrieve", dies_on_the_second_batch)
        with pytest.raises(RuntimeError, match="killed while polling"):
            _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        saved = list((tmp_path / "cache" / "batches").glob("*.json"))
        assert len(saved) == 1 and json.loads(saved[0].read_text())["batch_id"] == "batch-5"
        monkeypatch.setattr(BatchQueue, "_retrieve", real)
        labels, labeler = _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        assert labeler.client.batch.resumed == ["batch-5"]
        # explanations came from the cache, the simulations from the resumed batch: nothing asked twice
        assert _canon(server.batch_requests) == _canon(bodies_online) and server.requests == []
        assert _posts(server, "/batches") == 3
    _same_labels(labels, labels_online)
    assert not list((tmp_path / "cache" / "batches").glob("*.json"))
    _no_key_in(tmp_path)


# --- a killed process ---------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from tl_modular.labeling._client import ChatClient, ClientConfig
    SCHEMA = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
              "additionalProperties": False}
    url, cache = sys.argv[1], sys.argv[2]
    client = ChatClient(ClientConfig(model="stand-in", base_url=url, cache_dir=cache, batch=True,
                                     batch_poll_s=60.0, batch_max_poll_s=60.0, batch_collect_s=0.05))
    async def go():
        return await asyncio.gather(*(client.request([{"role": "user", "content": f"unit {i}"}], SCHEMA,
                                                     name="answer") for i in range(6)))
    asyncio.run(go())
""")


def test_a_killed_process_resumes_its_batch_and_pays_nothing_twice(tmp_path):
    cache = tmp_path / "cache"
    with ChatServer(_echo, api_key=KEY, batch_faults=[BatchFault(polls=3)]) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
        child = subprocess.Popen([sys.executable, "-c", _CHILD, server.url, str(cache)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while ("GET", "/batches/batch-2") not in server.calls:       # created, and polled once
                assert child.poll() is None, child.stdout.read().decode()
                assert time.monotonic() < deadline, "the child never polled its batch"
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert server.batch_requests == [] and _posts(server, "/batches") == 1
        [state] = (cache / "batches").glob("*.json")
        assert json.loads(state.read_text())["batch_id"] == "batch-2"
        replies = _ask(_client(server, cache), range(6))
        assert [r.data["label"] for r in replies] == [f"says unit {i}" for i in range(6)]
        assert _posts(server, "/batches") == 1 and _posts(server, "/files") == 1 and server.requests == []
        assert len(server.batch_requests) == 6
        assert _ask(_client(server, cache), range(6))[0].cached
    assert not state.exists()
    _no_key_in(tmp_path)


def test_a_batch_created_before_its_id_was_saved_is_found_by_its_input_file(tmp_path, monkeypatch):
    real, saves = _Job.save, []

    def dies_after_create(self):
        saves.append(dict(self.state))
        if self.state.get("batch_id"):
            raise RuntimeError("killed between create and save")
        real(self)

    with ChatServer(_echo) as server:
        monkeypatch.setattr(_Job, "save", dies_after_create)
        assert all(isinstance(r, RuntimeError) for r in _ask(_client(server, tmp_path), range(3)))
        monkeypatch.setattr(_Job, "save", real)
        client = _client(server, tmp_path)
        assert [r.data["label"] for r in _ask(client, range(3))] == [f"says unit {i}" for i in range(3)]
        assert client.batch.created == [] and client.batch.resumed == ["file-1"]
        assert _posts(server, "/batches") == 1 and len(server.batch_requests) == 3


# --- how batches end ----------------------------------------------------------------------------------

def test_a_slow_batch_is_polled_with_bounded_backoff(tmp_path):
    assert list(islice(poll_delays(10, 60), 6)) == [10, 20, 40, 60, 60, 60]
    with ChatServer(_echo, batch_faults=[BatchFault(polls=4)]) as server:
        replies = _ask(_client(server, tmp_path), range(5))
    assert [r.data["label"] for r in replies] == [f"says unit {i}" for i in range(5)]
    assert sum(1 for m, p in server.calls if m == "GET" and p == "/batches/batch-2") == 5


def test_an_expired_batch_keeps_its_answers_and_resubmits_the_rest(tmp_path):
    with ChatServer(_echo, batch_faults=[BatchFault(status="expired", done=2, polls=1)]) as server:
        client = _client(server, tmp_path)
        replies = _ask(client, range(5))
        assert [r.data["label"] for r in replies] == [f"says unit {i}" for i in range(5)]
        assert client.batch.created == ["batch-2", "batch-6"]
        assert server.batches["batch-6"]["request_counts"]["total"] == 3     # only the unanswered lines
        assert len(server.batch_requests) == 5 and server.requests == []
    with ChatServer(_echo, batch_faults=[BatchFault(status="expired", done=1)] * 2) as server:
        replies = _ask(_client(server, tmp_path / "b", batch_resubmits=1), range(3))
    assert [r.data["label"] for r in replies[:2]] == ["says unit 0", "says unit 1"]      # one line from each batch
    assert isinstance(replies[2], LLMError) and replies[2].reason == "batch_expired"
    assert "batch batch-6 expired" in str(replies[2]) and "resubmitted 1 time" in str(replies[2])


def test_a_failed_batch_names_its_id_and_errors(tmp_path, toy, toy_units):
    errors = [{"code": "invalid_json", "line": 3, "message": f"line 3 is not JSON (key {KEY})", "param": None}]
    with ChatServer(labeling.offline_chat_model, batch_faults=[BatchFault(status="failed", errors=errors)]) as server:
        with pytest.raises(tlm.LabelingError) as info:
            _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        assert info.value.reason == "batch_failed"
        text = str(info.value)
        assert "batch batch-2 failed: line 3: invalid_json: line 3 is not JSON" in text and KEY not in text
        assert not list((tmp_path / "cache" / "batches").glob("*.json"))   # nothing to resume: a re-run submits anew
        labels, _ = _label(toy, toy_units, server, tmp_path / "cache", batch=True)
        assert all(lab.ok for lab in labels) and _posts(server, "/batches") == 4


def test_line_errors_retry_online_or_fail_their_request(tmp_path):
    faults = [Fault(status=500, when=lambda b: b["messages"][0]["content"] == "unit 1"),
              Fault(status=400, body=json.dumps({"error": {"message": f"no such key {KEY}"}}),
                    when=lambda b: b["messages"][0]["content"] == "unit 2"),
              Fault(malformed="{not json", when=lambda b: b["messages"][0]["content"] == "unit 3")]
    with ChatServer(_echo, faults=faults) as server:
        client = _client(server, tmp_path)
        replies = _ask(client, range(5))
        assert [r.data["label"] for i, r in enumerate(replies) if i != 2] == [f"says unit {i}" for i in (0, 1, 3, 4)]
        assert isinstance(replies[2], LLMError) and replies[2].reason == "refused"
        assert "HTTP 400" in str(replies[2]) and "batch-2" in str(replies[2]) and "no such key ***" in str(replies[2])
        assert KEY not in str(replies[2])
        # the 500 was retried online; the malformed answer repaired in a follow-up batch
        assert [b["messages"][0]["content"] for b in server.requests] == ["unit 1"]
        assert len(client.batch.created) == 2 and len(server.batch_requests) == 6
        assert client.usage.retries == 1 and client.usage.repairs == 1 and client.usage.failures == 1
        sent = len(server.batch_requests) + len(server.requests)
        again = _ask(_client(server, tmp_path), range(5))
        assert len(server.batch_requests) + len(server.requests) == sent + 1   # only the refused one asked again
        assert again[2].data["label"] == "says unit 2" and all(again[i].cached for i in (0, 1, 3, 4))


def test_a_cancelled_batch_keeps_its_answers_and_fails_the_rest(tmp_path):
    with ChatServer(_echo, batch_faults=[BatchFault(status="cancelled", done=2)]) as server:
        replies = _ask(_client(server, tmp_path), range(5))
        failed = [r for r in replies if isinstance(r, LLMError)]
        assert [r.reason for r in failed] == ["batch_cancelled"] * 3 and "cancelled" in str(failed[0])
        assert [r.data["label"] for r in replies[:2]] == ["says unit 0", "says unit 1"]
        again = _ask(_client(server, tmp_path), range(5))
        assert all(not isinstance(r, BaseException) for r in again) and server.batches["batch-6"]["request_counts"][
            "total"] == 3


def test_a_server_without_a_batch_api_says_to_go_online(tmp_path):
    with ChatServer(_echo) as server:
        server._batch_api = lambda h, path, raw: server._send(h, 404, {"error": {"message": "Not Found"}})
        replies = _ask(_client(server, tmp_path), range(2))
    assert all(isinstance(r, LLMUnavailable) and r.reason == "not_found" for r in replies)
    assert "no Batch API" in str(replies[0]) and "batch=False" in str(replies[0])


def test_batch_bad_config(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="batch=True needs a response cache"):
        ChatClient(ClientConfig(batch=True, cache_dir=False))
    monkeypatch.setenv("TL_MODULAR_NO_LLM_CACHE", "1")
    with pytest.raises(ValueError, match="TL_MODULAR_NO_LLM_CACHE"):
        tlm.OpenAILabeler(model="m", batch=True)
    for bad in ({"batch_poll_s": 0}, {"batch_poll_s": 5, "batch_max_poll_s": 1}, {"batch_max_requests": 0},
                {"batch_resubmits": -1}, {"batch_collect_s": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClientConfig(batch=True, **bad)
    with pytest.raises(TypeError, match="batch must be True or False"):
        ClientConfig(batch="yes")
    with pytest.raises(TypeError, match="BatchFault"):
        ChatServer(batch_faults=[Fault()])
    with pytest.raises(ValueError, match="status"):
        BatchFault(status="lost")


def test_cli_llm_batch(tmp_path, capsys, monkeypatch):
    from tl_modular import cli

    assert cli.main(["analyze", "--llm-batch", "--out", str(tmp_path / "o")]) == 2
    assert "--llm-batch applies only with --labeler openai" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for argv, batch in (([], False), (["--llm-batch"], True)):
        args = cli._parser().parse_args(["analyze", "--labeler", "openai", "--out", str(tmp_path / "o"), *argv])
        cli._check_options(args)
        labeler, simulator = cli._labeler(args)
        assert labeler is simulator and labeler.config.batch is batch
        assert (labeler.client.batch is not None) is batch and KEY not in repr(labeler)


def test_many_requests_are_split_into_batches_by_count_and_size(tmp_path, monkeypatch):
    from tl_modular.labeling import _batch

    with ChatServer(_echo) as server:
        client = _client(server, tmp_path, batch_max_requests=4)
        assert [r.data["label"] for r in _ask(client, range(10))] == [f"says unit {i}" for i in range(10)]
        assert sorted(server.batches[b]["request_counts"]["total"] for b in client.batch.created) == [2, 4, 4]
        monkeypatch.setattr(_batch, "MAX_FILE_BYTES", 700)     # about three lines of ~220 bytes
        client = _client(server, tmp_path / "b")
        assert [r.data["label"] for r in _ask(client, range(7))] == [f"says unit {i}" for i in range(7)]
        sizes = [len(server.files[server.batches[b]["input_file_id"]]["content"]) for b in client.batch.created]
        assert len(sizes) >= 3 and max(sizes) <= 700


def test_the_same_client_resumes_after_an_interruption_and_joins_requests_in_flight(tmp_path, monkeypatch):
    real = BatchQueue._retrieve
    with ChatServer(_echo, batch_faults=[BatchFault(polls=1)]) as server:
        client = _client(server, tmp_path)
        monkeypatch.setattr(BatchQueue, "_retrieve", lambda self, bid: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            _ask(client, range(3))
        monkeypatch.setattr(BatchQueue, "_retrieve", real)
        # the same client (a notebook re-running the cell) waits for the same batch
        assert [r.data["label"] for r in _ask(client, range(3))] == [f"says unit {i}" for i in range(3)]
        assert client.batch.created == ["batch-2"] and client.batch.resumed == ["batch-2"]

        async def twice_the_same_request_at_different_times():
            try:
                first = asyncio.ensure_future(client.request(_msgs(7), SCHEMA, name="answer"))
                while _posts(server, "/batches") < 2:           # until the first is in a batch
                    await asyncio.sleep(0.01)
                second = await client.request(_msgs(7), SCHEMA, name="answer")
                return await first, second
            finally:
                await client.aclose()
        server.batch_faults.append(BatchFault(polls=10))       # in flight long enough for the second to join
        first, second = asyncio.run(twice_the_same_request_at_different_times())
        assert first.data == second.data == {"label": "says unit 7"} and len(client.batch.created) == 2
        assert len(server.batch_requests) == 4


def test_the_budget_is_checked_when_a_batch_is_submitted(tmp_path):
    from tl_modular.labeling import BudgetExceeded

    with ChatServer(_echo) as server:
        client = _client(server, tmp_path, budget_usd=1e-9)
        assert all(r.data for r in _ask(client, range(3)))            # nothing spent yet: the batch goes
        assert client.usage.cost_usd == pytest.approx(3 * (2 * 0.15 + 4 * 0.60) / 1e6 / 2, rel=1e-12)
        calls = len(server.calls)
        assert all(isinstance(r, BudgetExceeded) for r in _ask(client, range(3, 5)))
        assert len(server.calls) == calls                                 # spent: nothing submitted


def test_a_run_stopped_after_resubmitting_an_expired_batch_resumes_both(tmp_path, monkeypatch):
    real = BatchQueue._retrieve

    async def dies_on_the_resubmission(self, batch_id):
        if len(self.created) == 2:
            raise RuntimeError("killed")
        return await real(self, batch_id)

    with ChatServer(_echo, batch_faults=[BatchFault(status="expired", done=2)]) as server:
        monkeypatch.setattr(BatchQueue, "_retrieve", dies_on_the_resubmission)
        first = _ask(_client(server, tmp_path), range(5))
        assert [r.data["label"] for r in first[:2]] == ["says unit 0", "says unit 1"]   # answered before it expired
        assert all(isinstance(r, RuntimeError) for r in first[2:])
        # the expired batch's answers are cached, so its file went; the resubmission's stays
        [state] = (tmp_path / "batches").glob("*.json")
        assert json.loads(state.read_text())["batch_id"] == "batch-6"
        monkeypatch.setattr(BatchQueue, "_retrieve", real)
        client = _client(server, tmp_path)
        replies = _ask(client, range(5))
        assert [r.data["label"] for r in replies] == [f"says unit {i}" for i in range(5)]
        assert [r.cached for r in replies] == [True, True, False, False, False]
        assert client.batch.created == [] and client.batch.resumed == ["batch-6"]
        assert _posts(server, "/batches") == 2 and len(server.batch_requests) == 5
    assert not list((tmp_path / "batches").glob("*.json"))
    # killed before the expired batch's file went: both files stay, and each line is resumed from the
    # newest batch that holds it (the expired one would expire again and be resubmitted: paid twice)
    with ChatServer(_echo, batch_faults=[BatchFault(status="expired", done=2)]) as server:
        monkeypatch.setattr(BatchQueue, "_retrieve", dies_on_the_resubmission)
        monkeypatch.setattr(BatchQueue, "consumed", lambda self, ids: None)
        _ask(_client(server, tmp_path / "b"), range(5))
        assert len(list((tmp_path / "b" / "batches").glob("*.json"))) == 2
        monkeypatch.setattr(BatchQueue, "_retrieve", real)
        client = _client(server, tmp_path / "b")
        assert [r.data["label"] for r in _ask(client, range(5))] == [f"says unit {i}" for i in range(5)]
        assert client.batch.created == [] and client.batch.resumed == ["batch-6"]
        assert _posts(server, "/batches") == 2 and len(server.batch_requests) == 5


def test_a_damaged_output_file_and_stale_state_files(tmp_path, monkeypatch):
    real = ChatServer._store

    def damaged(self, lines, name):
        fid = real(self, lines, name)
        if fid is not None and "output" in name:
            self.files[fid]["content"] = b'{"id": "x"}\nnot json\n'
        return fid

    with ChatServer(_echo) as server:
        monkeypatch.setattr(ChatServer, "_store", damaged)
        replies = _ask(_client(server, tmp_path), range(2))
        assert all(isinstance(r, LLMUnavailable) and r.reason == "batch_failed" for r in replies)
        assert "line 1 of file file-3 of batch batch-2 is not a batch result (KeyError" in str(replies[0])
        assert len(list((tmp_path / "batches").glob("*.json"))) == 1       # kept: a re-run downloads it again
        monkeypatch.setattr(ChatServer, "_store", real)
    stale = tmp_path / "batches" / "old.json"
    stale.write_text(json.dumps({"version": 1, "saved_at": time.time() - 31 * 86400, "custom_ids": []}))
    with ChatServer(_echo) as server:
        assert [r.data for r in _ask(_client(server, tmp_path), range(1))] == [{"label": "says unit 0"}]
    assert not stale.exists()
