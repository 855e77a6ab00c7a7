"""The LLM request layer (``tl_modular.labeling._client``) against the loopback server: the real
``openai.AsyncOpenAI`` client over real HTTP on 127.0.0.1, with scripted answers and injected faults
(500s, 429 with Retry-After, slow answers, malformed JSON, schema mismatches). No test touches the internet.

Token counts are the server's word counts, so costs are exact closed forms.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import re
import time

import pytest

from tl_modular.labeling._client import (
    BudgetExceeded,
    ChatClient,
    ClientConfig,
    InvalidAnswer,
    LLMError,
    LLMUnavailable,
    Usage,
    _retry_after,
    validate,
)
from tl_modular.labeling.testing_server import ChatServer, Fault

KEY = "sk-test-NEVER-STORE-7d1e0b"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string"},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 10}},
          "required": ["label", "score"], "additionalProperties": False}
GOOD = '{"label": "the word cat", "score": 7}'           # 6 words -> 6 completion tokens


def _msgs(i: int = 0) -> list[dict]:
    return [{"role": "system", "content": "You label units."},          # 3 words
            {"role": "user", "content": f"unit {i} fires on cats"}]      # 5 words -> 8 prompt tokens


def _client(server: ChatServer, **cfg) -> ChatClient:
    cfg = {"model": "stand-in", "base_url": server.url, "api_key": "none", "backoff_s": 0.001, **cfg}
    return ChatClient(ClientConfig(**cfg))


async def _gather(client: ChatClient, n: int, **kw) -> list:
    try:
        return await asyncio.gather(*(client.request(_msgs(i), SCHEMA, name="answer", **kw) for i in range(n)),
                                    return_exceptions=True)
    finally:
        await client.aclose()


# --- happy path, accounting --------------------------------------------------------------------------

def test_happy_path_counts_tokens_and_cost():
    with ChatServer(lambda body: GOOD) as server:
        client = _client(server, price_per_mtok_input=2.0, price_per_mtok_output=10.0, seed=3, temperature=0.5)
        reply = client.request_sync(_msgs(), SCHEMA, name="answer", max_tokens=77)
    assert reply.data == {"label": "the word cat", "score": 7} and not reply.cached and reply.logprobs is None
    assert (reply.usage.requests, reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1, 8, 6)
    assert reply.usage.cost_usd == pytest.approx((8 * 2.0 + 6 * 10.0) / 1e6, rel=1e-12)
    assert client.usage == reply.usage
    body = server.requests[0]          # what went over the wire
    assert body["model"] == "stand-in" and body["messages"] == _msgs() and body["max_tokens"] == 77
    assert body["seed"] == 3 and body["temperature"] == 0.5 and "logprobs" not in body
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def test_usage_arithmetic_and_json():
    a = Usage(requests=1, prompt_tokens=3, cost_usd=0.5)
    b = Usage(cached=2, retries=1, completion_tokens=4, cost_usd=0.25)
    total = a + b
    assert total.to_json() == {"requests": 1, "cached": 2, "retries": 1, "failures": 0, "repairs": 0,
                               "prompt_tokens": 3, "completion_tokens": 4, "cost_usd": 0.75}
    assert a.to_json()["cached"] == 0            # + makes a new object
    a += b
    assert a == total


# --- retries -----------------------------------------------------------------------------------------

def test_500s_are_retried():
    with ChatServer(lambda body: GOOD, faults=[Fault(status=500), Fault(status=502)]) as server:
        client = _client(server)
        reply = client.request_sync(_msgs(), SCHEMA, name="answer")
    assert reply.data["score"] == 7 and len(server.requests) == 3
    assert reply.usage.retries == 2 and client.usage.retries == 2 and reply.usage.requests == 1


def test_429_retry_after_is_honoured_and_capped():
    with ChatServer(lambda body: GOOD, faults=[Fault(status=429, retry_after=1)]) as server:
        client = _client(server)
        start = time.monotonic()
        reply = client.request_sync(_msgs(), SCHEMA, name="answer")
        waited = time.monotonic() - start
    assert waited >= 1.0 and reply.usage.retries == 1      # slack upward only
    # a Retry-After beyond max_backoff_s waits max_backoff_s (30 s here would hang the run)
    with ChatServer(lambda body: GOOD, faults=[Fault(status=503, retry_after=30)]) as server:
        client = _client(server, max_backoff_s=0.2)
        start = time.monotonic()
        client.request_sync(_msgs(), SCHEMA, name="answer")
        waited = time.monotonic() - start
    assert 0.2 <= waited < 5.0


def test_retry_after_header_forms():
    assert _retry_after({"retry-after": "2.5"}) == 2.5
    assert _retry_after({"retry-after": "-3"}) == 0.0
    assert _retry_after({}) is None and _retry_after(None) is None
    assert _retry_after({"retry-after": "soon"}) is None                  # garbage: plain backoff
    date = email.utils.formatdate(time.time() + 20, usegmt=True)           # HTTP date, 1 s resolution
    assert 18.0 <= _retry_after({"retry-after": date}) <= 20.0
    assert _retry_after({"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0


def test_slow_answer_times_out_and_is_retried():
    faults = [Fault(delay_s=1.5, malformed='{"label": "late", "score": 1}')]
    with ChatServer(lambda body: GOOD, faults=faults) as server:
        client = _client(server, timeout_s=0.3)
        start = time.monotonic()
        reply = client.request_sync(_msgs(), SCHEMA, name="answer")
        took = time.monotonic() - start
    assert reply.data["label"] == "the word cat" and reply.usage.retries == 1 and len(server.requests) == 2
    assert 0.3 <= took < 1.5                     # gave up on the slow one instead of waiting it out


def test_persistent_500_fails_after_max_retries():
    with ChatServer(lambda body: GOOD, faults=[Fault(status=500)] * 10) as server:
        client = _client(server, max_retries=3)
        with pytest.raises(LLMError, match=r"failed 4 times \(last: HTTP 500\).*max_retries") as err:
            client.request_sync(_msgs(), SCHEMA, name="answer")
    assert type(err.value) is LLMError and len(server.requests) == 4
    assert client.usage.retries == 3 and client.usage.failures == 1 and client.usage.requests == 0


def test_connection_refused_is_retried_then_reported():
    with ChatServer() as server:
        url = server.url                        # the port is free again once the server stops
    client = ChatClient(ClientConfig(base_url=url.replace("//", f"//user:{KEY}@"), api_key="none", backoff_s=0.001,
                                     max_retries=2))
    shown = url.replace("//", "//***@")
    # a server never reached: unavailable for good, after the retries
    with pytest.raises(LLMUnavailable, match=f"cannot reach the server at {re.escape(shown)} \\(3 attempts.*"
                                             "ConnectError") as err:
        client.request_sync(_msgs(), SCHEMA, name="answer")
    assert KEY not in str(err.value) and err.value.reason == "unreachable" and client.usage.retries == 2


def test_401_fails_at_once_without_the_key():
    with ChatServer(lambda body: GOOD, api_key="the-right-key") as server:
        client = _client(server, api_key=KEY)
        with pytest.raises(LLMError, match=r"HTTP 401.*check the API key.*Incorrect API key") as err:
            client.request_sync(_msgs(), SCHEMA, name="answer")
        assert len(server.requests) == 1 and client.usage.retries == 0 and client.usage.failures == 1
        text = "".join(str(e) for e in (err.value, err.value.__cause__, err.value.__context__) if e is not None)
        assert KEY not in text and KEY not in repr(err.value)
        # the right key gets through
        ok = _client(server, api_key="the-right-key").request_sync(_msgs(), SCHEMA, name="answer")
        assert ok.data["score"] == 7


def test_a_server_echoing_the_key_does_not_leak_it():
    echo = Fault(status=400, body=json.dumps({"error": {"message": f"bad request for key {KEY}"}}))
    with ChatServer(lambda body: GOOD, faults=[echo]) as server:
        client = _client(server, api_key=KEY)
        with pytest.raises(LLMError, match=r"HTTP 400.*\*\*\*") as err:
            client.request_sync(_msgs(), SCHEMA, name="answer")
    assert KEY not in str(err.value) and len(server.requests) == 1


def test_no_key_says_how_to_set_one(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = ChatClient(ClientConfig(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(LLMError, match=r"OPENAI_API_KEY.*api_key="):
        client.request_sync(_msgs(), SCHEMA, name="answer")


# --- validation and repair ---------------------------------------------------------------------------

def _repair_turns(body: dict) -> tuple[str, str]:
    assert body["messages"][:2] == _msgs()
    assistant, user = body["messages"][2:]
    assert assistant["role"] == "assistant" and user["role"] == "user"
    return assistant["content"], user["content"]


@pytest.mark.parametrize(("bad", "error"), [
    ("{not json", "not valid JSON"),
    ('{"label": "cat"}', "missing the required field 'score'"),
    ('{"label": "cat", "score": 11}', r"$.score must be <= 10, got 11"),
    ('{"label": "cat", "score": 2.5}', "$.score must be of type integer"),
    ('{"label": "cat", "score": 2, "why": "x"}', "unexpected fields ['why']"),
])
def test_invalid_answer_is_repaired_once(bad, error):
    with ChatServer(lambda body: GOOD, faults=[Fault(malformed=bad)]) as server:
        client = _client(server)
        reply = client.request_sync(_msgs(), SCHEMA, name="answer")
    assert reply.data["score"] == 7 and len(server.requests) == 2
    assert reply.usage.repairs == 1 and reply.usage.requests == 2 and reply.usage.failures == 0
    bad_turn, repair = _repair_turns(server.requests[1])
    assert bad_turn == bad and error in repair and "JSON only" in repair
    assert reply.usage.prompt_tokens == 8 + sum(len(m["content"].split()) for m in server.requests[1]["messages"])


def test_still_invalid_after_repair_raises():
    with ChatServer(lambda body: '{"label": 3, "score": 1}') as server:
        client = _client(server)
        with pytest.raises(InvalidAnswer, match=r"answer answer is invalid after one repair: \$.label must be "
                                                r"of type string"):
            client.request_sync(_msgs(), SCHEMA, name="answer")
    assert len(server.requests) == 2 and client.usage.repairs == 1 and client.usage.failures == 1
    assert client.usage.requests == 2 and client.usage.prompt_tokens > 0      # the spending still counts


def test_fenced_answer_is_accepted():
    with ChatServer(lambda body: f"```json\n{GOOD}\n```") as server:
        reply = _client(server).request_sync(_msgs(), SCHEMA, name="answer")
    assert reply.data["score"] == 7 and reply.usage.repairs == 0


def test_validator_subset():
    schema = {"type": "object", "required": ["xs", "kind"], "additionalProperties": False,
              "properties": {"xs": {"type": "array", "minItems": 1, "maxItems": 3,
                                    "items": {"type": "number", "minimum": -1, "maximum": 1}},
                             "kind": {"type": "string", "enum": ["a", "b"]},
                             "flag": {"type": "boolean"}, "note": {"type": ["string", "null"]}}}
    assert validate({"xs": [0, 0.5, -1], "kind": "a", "flag": True, "note": None}, schema) is None
    cases = {"$.xs must have at least 1 items": {"xs": [], "kind": "a"},
             "$.xs must have at most 3 items": {"xs": [0] * 4, "kind": "a"},
             "$.xs[1] must be <= 1, got 2": {"xs": [0, 2], "kind": "a"},
             "$.xs[0] must be of type number, got bool": {"xs": [True], "kind": "a"},
             "$.kind must be one of ['a', 'b']": {"xs": [0], "kind": "c"},
             "$.flag must be of type boolean, got int": {"xs": [0], "kind": "a", "flag": 1},
             "$.note must be one of the types": {"xs": [0], "kind": "a", "note": 3},
             "$ must be of type object, got list": []}
    for message, value in cases.items():
        assert validate(value, schema).startswith(message), (value, validate(value, schema))
    assert validate(True, {"type": "integer"}) is not None and validate(3, {"type": "number"}) is None
    with pytest.raises(ValueError, match="unsupported JSON-schema type 'date'"):
        validate("x", {"type": "date"})


# --- cache -------------------------------------------------------------------------------------------

def test_cache_rerun_costs_nothing_and_holds_no_key(tmp_path):
    cache = tmp_path / "cache"
    with ChatServer(lambda body: GOOD.replace("cat", body["messages"][1]["content"].split()[1]),
                    api_key=KEY) as server:
        first = asyncio.run(_gather(_client(server, api_key=KEY, cache_dir=cache), 6))
        assert len(server.requests) == 6
        client = _client(server, api_key=KEY, cache_dir=cache)
        second = asyncio.run(_gather(client, 6))
        assert len(server.requests) == 6                          # nothing sent the second time
    assert [r.data for r in second] == [r.data for r in first] and first[3].data["label"] == "the word 3"
    assert all(r.cached and r.usage == Usage(cached=1) for r in second)
    assert client.usage.requests == 0 and client.usage.cached == 6 and client.usage.cost_usd == 0
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    assert len(files) == 6 and all(p.suffix == ".json" and not p.name.startswith(".") for p in files)  # no temp
    for p in files:                                              # two-level fan-out: ab/ab….json
        assert p.parent.name == p.name[:2] and len(p.stem) == 64 and p.parent.parent == cache
        assert KEY.encode() not in p.read_bytes()
        entry = json.loads(p.read_text())
        assert entry["key"] == p.stem and entry["usage"]["requests"] == 1 and entry["usage"]["prompt_tokens"] == 8
    assert KEY not in repr(client.config) and KEY not in repr(client)
    # each file is named by the key of the request it answers
    asked = {client.cache_key(_msgs(i), SCHEMA, "answer", False, 5, 1024) for i in range(6)}
    assert {p.stem for p in files} == asked


def test_openai_labeler_caches_in_the_user_cache_by_default(tmp_path, monkeypatch):
    import tl_modular as tlm
    from tl_modular.labeling._client import default_cache_dir

    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.delenv("TL_MODULAR_NO_LLM_CACHE", raising=False)
    assert default_cache_dir() == xdg / "tl_modular" / "llm"
    with ChatServer(lambda body: GOOD, api_key=KEY) as server:
        def labeler(**kw):
            return tlm.OpenAILabeler(model="stand-in", base_url=server.url, api_key=KEY, **kw)

        first = asyncio.run(_gather(labeler().client, 3))
        second = asyncio.run(_gather(labeler().client, 3))      # a fresh labeler: a re-run, nothing sent
        assert len(server.requests) == 3 and all(r.cached for r in second) and not any(r.cached for r in first)
        files = [p for p in xdg.rglob("*") if p.is_file()]
        assert len(files) == 3 and all(p.is_relative_to(xdg / "tl_modular" / "llm") for p in files)
        assert not any(KEY.encode() in p.read_bytes() for p in files)      # the cache holds no secret
        # switched off: by argument, by a config that says so, or by the environment
        asyncio.run(_gather(labeler(cache_dir=False).client, 3))
        assert len(server.requests) == 6
        off = tlm.OpenAILabeler(config=ClientConfig(model="stand-in", base_url=server.url, api_key=KEY,
                                                    cache_dir=False))
        asyncio.run(_gather(off.client, 3))
        assert len(server.requests) == 9
        monkeypatch.setenv("TL_MODULAR_NO_LLM_CACHE", "1")
        assert default_cache_dir() is None and labeler().client._cache is None
        asyncio.run(_gather(labeler().client, 3))
        assert len(server.requests) == 12
        # an explicit folder (argument or config) is used as given, environment or not
        mine = tmp_path / "mine"
        assert labeler(cache_dir=mine).client._cache == mine
        assert tlm.OpenAILabeler(config=ClientConfig(cache_dir=str(mine), api_key=KEY)).client._cache == mine
    assert len([p for p in xdg.rglob("*") if p.is_file()]) == 3
    monkeypatch.delenv("TL_MODULAR_NO_LLM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tl_modular" / "llm"


def test_cache_key_covers_what_shapes_the_answer():
    client = ChatClient(ClientConfig(api_key=KEY, base_url="http://u:pw@host:8000/v1"))
    args = dict(messages=_msgs(), schema=SCHEMA, name="answer", logprobs=False, top_logprobs=5, max_tokens=100)
    key = client.cache_key(**args)
    # the sha256 of the request's documented content, the credentials (in the URL, the key) left out
    request = {"model": "gpt-4o-mini", "base_url": "http://host:8000/v1", "messages": _msgs(), "schema": SCHEMA,
               "name": "answer", "temperature": 0.0, "seed": 0, "logprobs": False, "top_logprobs": None,
               "max_tokens": 100}
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert key == hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert key == ChatClient(ClientConfig(api_key="another", base_url="http://host:8000/v1")).cache_key(**args)
    changed = [dict(args, messages=_msgs(1)), dict(args, schema={**SCHEMA, "required": ["label"]}),
               dict(args, name="other"), dict(args, logprobs=True), dict(args, max_tokens=101)]
    keys = {client.cache_key(**a) for a in changed}
    assert len(keys) == len(changed) and key not in keys
    for cfg in (dict(model="other"), dict(temperature=0.7), dict(seed=1), dict(base_url="http://other/v1")):
        assert ChatClient(ClientConfig(**cfg)).cache_key(**args) != key
    leaky = ChatClient(ClientConfig(api_key=KEY, base_url=f"http://host:8000/v1?key={KEY}"))
    assert leaky._public_url() == "http://host:8000/v1?key=***" and KEY not in repr(leaky) + repr(leaky.config)
    assert client._public_url() == "http://***@host:8000/v1"
    # top_logprobs only matters when logprobs are asked for
    assert client.cache_key(**dict(args, top_logprobs=2)) == key


def test_damaged_or_stale_cache_entry_is_asked_again(tmp_path):
    with ChatServer(lambda body: GOOD) as server:
        client = _client(server, cache_dir=tmp_path)
        client.request_sync(_msgs(), SCHEMA, name="answer")
        (path,) = [p for p in tmp_path.rglob("*.json")]
        path.write_text("{half")                                 # e.g. written by hand, truncated
        with pytest.warns(RuntimeWarning, match=f"{path.name} is not valid JSON.*line 1, column 2.*asked again"):
            reply = client.request_sync(_msgs(), SCHEMA, name="answer")
        assert not reply.cached and len(server.requests) == 2 and json.loads(path.read_text())["data"] == reply.data
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({**entry, "data": {"label": "x"}}))   # no longer fits the schema
        assert not client.request_sync(_msgs(), SCHEMA, name="answer").cached and len(server.requests) == 3
        path.write_text(json.dumps({**entry, "version": 0}))           # written by another format version
        assert not client.request_sync(_msgs(), SCHEMA, name="answer").cached and len(server.requests) == 4
        assert client.request_sync(_msgs(), SCHEMA, name="answer").cached and len(server.requests) == 4


def test_invalid_answers_are_not_cached(tmp_path):
    with ChatServer(lambda body: "{nope") as server:
        client = _client(server, cache_dir=tmp_path)
        with pytest.raises(InvalidAnswer):
            client.request_sync(_msgs(), SCHEMA, name="answer")
    assert not any(tmp_path.rglob("*"))


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    n = 12

    async def interrupted(client: ChatClient) -> int:
        tasks = [asyncio.create_task(client.request(_msgs(i), SCHEMA, name="answer")) for i in range(n)]
        done, pending = await asyncio.wait(tasks, timeout=0.35)    # ~2 waves of 2 at 0.1 s latency
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await client.aclose()
        return sum(1 for t in done if not t.cancelled() and t.exception() is None)

    with ChatServer(lambda body: GOOD, latency_s=0.1) as server:
        finished = asyncio.run(interrupted(_client(server, cache_dir=tmp_path, max_concurrency=2)))
        cached = len(list(tmp_path.rglob("*.json")))
        assert 0 < finished < n and cached == finished
        sent_before = len(server.requests)
        replies = asyncio.run(_gather(_client(server, cache_dir=tmp_path, max_concurrency=n), n))
    assert all(not isinstance(r, BaseException) for r in replies)
    assert len(server.requests) - sent_before == n - finished
    assert sum(r.cached for r in replies) == finished and len(list(tmp_path.rglob("*.json"))) == n
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".json"]    # no temp files left


# --- budget ------------------------------------------------------------------------------------------

def test_budget_stops_cleanly_before_the_request_it_cannot_cover(tmp_path):
    per_request = (8 * 0.15 + 6 * 0.60) / 1e6                    # 8 prompt, 6 completion tokens
    with ChatServer(lambda body: GOOD) as server:
        client = _client(server, cache_dir=tmp_path, budget_usd=2.5 * per_request)
        replies = [client.request_sync(_msgs(i), SCHEMA, name="answer") for i in range(3)]
        with pytest.raises(BudgetExceeded, match=r"budget of \$1\.2e-05 is spent \(\$1\.44e-05 over 3 requests, "
                                                 r"42 tokens\); raise budget_usd") as err:
            client.request_sync(_msgs(3), SCHEMA, name="answer")
        assert len(server.requests) == 3 and isinstance(err.value, LLMError)
        assert client.usage.cost_usd == pytest.approx(3 * per_request) and len(replies) == 3
        assert len(list(tmp_path.rglob("*.json"))) == 3            # nothing half-written
        # cached answers stay free after the budget is spent
        assert client.request_sync(_msgs(0), SCHEMA, name="answer").cached
        tokens = _client(server, max_total_tokens=20)
        tokens.request_sync(_msgs(0), SCHEMA, name="answer")
        tokens.request_sync(_msgs(1), SCHEMA, name="answer")         # 14 < 20: allowed; 28 afterwards
        with pytest.raises(BudgetExceeded, match="token budget of 20"):
            tokens.request_sync(_msgs(2), SCHEMA, name="answer")
        assert tokens.usage.prompt_tokens + tokens.usage.completion_tokens == 28


def test_budget_lets_in_flight_requests_finish():
    per_request = (8 * 0.15 + 6 * 0.60) / 1e6
    with ChatServer(lambda body: GOOD, latency_s=0.05) as server:
        client = _client(server, max_concurrency=4, budget_usd=per_request / 2)
        replies = asyncio.run(_gather(client, 10))
    ok = [r for r in replies if not isinstance(r, BaseException)]
    assert len(ok) == 4 and len(server.requests) == 4             # the first wave was already on its way
    assert all(isinstance(r, BudgetExceeded) for r in replies if r not in ok)
    assert client.usage.requests == 4


# --- concurrency -------------------------------------------------------------------------------------

def test_concurrency_limit_is_what_the_server_sees():
    with ChatServer(lambda body: GOOD, latency_s=0.2) as server:
        client = _client(server, max_concurrency=4)
        start = time.monotonic()
        replies = asyncio.run(_gather(client, 16))
        took = time.monotonic() - start
    assert all(r.data["score"] == 7 for r in replies)
    assert server.max_in_flight == 4 and len(server.requests) == 16
    assert took >= 4 * 0.2                                        # 4 waves at least (no upper bound: shared CPU)


def test_server_handles_16_slow_requests_at_once():
    with ChatServer(lambda body: GOOD, latency_s=0.3) as server:
        replies = asyncio.run(_gather(_client(server, max_concurrency=16), 16))
    assert all(not isinstance(r, BaseException) for r in replies) and server.max_in_flight == 16


def test_request_sync_inside_a_running_loop():
    with ChatServer(lambda body: GOOD) as server:
        client = _client(server)

        async def notebook_cell() -> dict:
            return client.request_sync(_msgs(), SCHEMA, name="answer").data    # e.g. Jupyter's running loop

        assert asyncio.run(notebook_cell())["score"] == 7


def test_a_given_openai_client_is_used():
    import openai

    with ChatServer(lambda body: GOOD, faults=[Fault(delay_s=1.5, malformed=GOOD)]) as server:
        given = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)

        async def go() -> object:
            try:
                return await ChatClient(ClientConfig(timeout_s=0.3, backoff_s=0.001), client=given).request(
                    _msgs(), SCHEMA, name="answer")
            finally:
                await given.close()

        start = time.monotonic()
        reply = asyncio.run(go())
    assert reply.data["score"] == 7 and reply.usage.retries == 1 and time.monotonic() - start < 1.5


# --- logprobs ----------------------------------------------------------------------------------------

def test_logprobs_pass_through(tmp_path):
    with ChatServer(lambda body: '{"a": 7}') as server:
        client = _client(server, cache_dir=tmp_path)
        reply = client.request_sync(_msgs(), {"type": "object"}, name="sim", logprobs=True, top_logprobs=3)
        again = client.request_sync(_msgs(), {"type": "object"}, name="sim", logprobs=True, top_logprobs=3)
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 3
    assert [t["token"] for t in reply.logprobs] == ["{", '"', "a", '"', ":", " ", "7", "}"]
    assert reply.logprobs[6] == {"token": "7", "logprob": 0.0, "top_logprobs": [{"token": "7", "logprob": 0.0}]}
    assert again.cached and again.logprobs == reply.logprobs and len(server.requests) == 1

    scripted = [{"token": "7", "logprob": -0.1,
                 "top_logprobs": [{"token": "7", "logprob": -0.1}, {"token": "8", "logprob": -2.4}]}]
    with ChatServer(lambda body: {"content": '{"a": 7}', "logprobs": scripted}) as server:
        reply = _client(server).request_sync(_msgs(), {"type": "object"}, name="sim", logprobs=True)
    assert reply.logprobs == scripted
    with ChatServer(lambda body: '{"a": 7}', logprobs=False) as server:     # a server that never offers them
        reply = _client(server).request_sync(_msgs(), {"type": "object"}, name="sim", logprobs=True)
    assert reply.logprobs is None and reply.data == {"a": 7}


# --- the server itself, and bad input ----------------------------------------------------------------

def test_server_scripts_faults_per_request():
    def respond(body: dict) -> str | Fault:
        text = body["messages"][-1]["content"]
        return Fault(status=503, retry_after=0) if "unit 1 " in text else GOOD

    only_2 = Fault(malformed="[]", when=lambda body: "unit 2 " in body["messages"][-1]["content"])
    with ChatServer(respond, faults=[only_2]) as server:
        client = _client(server, max_retries=1)
        replies = asyncio.run(_gather(client, 3))
    assert replies[0].data["score"] == 7 and replies[2].usage.repairs == 1
    assert isinstance(replies[1], LLMError) and "HTTP 503" in str(replies[1])
    assert server.faults == []                                    # the predicate fault was used once
    with ChatServer(lambda body: 1 / 0) as server:                  # a broken script is a visible 500
        with pytest.raises(LLMError, match="failed 1 times"):
            _client(server, max_retries=0).request_sync(_msgs(), SCHEMA, name="answer")
    with ChatServer() as server:
        url = server.url
    with pytest.raises(RuntimeError, match="context manager"):
        _ = server.url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")


def test_bad_config_and_server_input():
    for kwargs, field in [({"max_concurrency": 0}, "max_concurrency"), ({"max_retries": -1}, "max_retries"),
                          ({"backoff_s": -1.0}, "backoff_s"), ({"timeout_s": 0}, "timeout_s"),
                          ({"budget_usd": -1.0}, "budget_usd"), ({"max_total_tokens": -5}, "max_total_tokens"),
                          ({"price_per_mtok_output": -0.1}, "price_per_mtok_output"), ({"model": ""}, "model")]:
        with pytest.raises(ValueError, match=field):
            ClientConfig(**kwargs)
    with pytest.raises(TypeError):
        ClientConfig("gpt-4o-mini")                              # keyword-only
    with pytest.raises(TypeError, match="Fault objects"):
        ChatServer(faults=[500])
    with pytest.raises(ValueError, match="latency_s"):
        ChatServer(latency_s=-1)
    with pytest.raises(TypeError, match="max_concurrency must be an int"):
        ClientConfig(max_concurrency=2.5)
