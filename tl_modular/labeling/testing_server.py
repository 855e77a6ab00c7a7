"""A real OpenAI-compatible chat-completions server on loopback, with scripted answers and faults.

For tests (and for trying prompts) without a model or a network: ``ChatServer(respond)`` serves
``POST /v1/chat/completions`` on ``127.0.0.1`` from a thread pool, answering each request body with
``respond(body)`` after ``latency_s`` seconds, in the OpenAI response shape (``usage`` counted in
words, ``logprobs`` when asked). Faults are injected in order, each once, or only for matching
requests: HTTP errors with ``Retry-After``, malformed answers, slow responses.

>>> faults = [Fault(status=429, retry_after=1)]
>>> with ChatServer(lambda body: '{"label": "x"}', faults=faults) as server:          # doctest: +SKIP
...     client = openai.OpenAI(base_url=server.url, api_key="none")
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(kw_only=True)
class Fault:
    """One injected failure, used once (for the first request that matches ``when``).

    Attributes:
        status: HTTP status to answer with (ignored when ``malformed`` is set).
        retry_after: ``Retry-After`` header value (seconds or an HTTP date).
        body: Error body text (default: an OpenAI-style error object).
        delay_s: Sleep before answering (a slow response; beyond the client's timeout it times out).
        malformed: Answer 200 with this raw content as the assistant message instead of an error.
        when: Apply only to requests for which this returns True.
    """

    status: int = 500
    retry_after: float | str | None = None
    body: str | None = None
    delay_s: float = 0.0
    malformed: str | None = None
    when: Callable[[dict], bool] | None = None


_TOKEN = re.compile(r"-?\d+|\w+|[^\w\s]|\s+")


def _tokens(text: str) -> list[str]:
    """A simple deterministic tokenization for logprobs: numbers, words, single symbols, spaces."""
    return _TOKEN.findall(text)


class ChatServer:
    """The loopback server (a context manager); see the module docs.

    Args:
        respond: ``request body -> assistant content`` (a string, or ``{"content", "logprobs"}`` to
            script the logprobs too, or a :class:`Fault` to fail this request). Default: ``{}``.
        latency_s: Seconds every answer waits (handled concurrently).
        faults: Injected failures, in order.
        logprobs: Offer token log-probabilities when a request asks (False: a server that never does).
        api_key: When given, requests get 401 unless they carry it as ``Authorization: Bearer <api_key>``
            or as the password of HTTP Basic auth (what a client sends for ``https://user:KEY@host/v1``).
        models: When given, requests for another model get 404 ``model_not_found`` (as OpenAI answers).
        port: Port on 127.0.0.1 (0: any free one).

    Attributes:
        url: ``http://127.0.0.1:PORT/v1`` — pass as ``base_url``.
        requests: Every request body received (for assertions).
        max_in_flight: The most requests that were being handled at once.
    """

    def __init__(self, respond: Callable[[dict], str | dict | Fault] | None = None, *, latency_s: float = 0.0,
                 faults: Sequence[Fault] = (), logprobs: bool = True, api_key: str | None = None,
                 models: Sequence[str] | None = None, port: int = 0) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s}")
        bad = [f for f in faults if not isinstance(f, Fault)]
        if bad:
            raise TypeError(f"faults must be Fault objects, got {bad[0]!r}; e.g. Fault(status=429, retry_after=1)")
        self.respond = respond or (lambda body: "{}")
        self.latency_s = latency_s
        self.faults = list(faults)
        self.logprobs = logprobs
        self.api_key = api_key
        self.models = None if models is None else list(models)
        self.port = port
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the server is not running: use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:      # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                server._handle(self)

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    # --- handling ------------------------------------------------------------------------------------

    def _fault_for(self, body: dict) -> Fault | None:
        with self._lock:
            for i, f in enumerate(self.faults):
                if f.when is None or f.when(body):
                    return self.faults.pop(i)
        return None

    def _send(self, h: BaseHTTPRequestHandler, status: int, payload: dict | str,
              headers: dict[str, str] | None = None) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (a timeout test)
            pass

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length", 0))
        raw = h.rfile.read(length)
        if h.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send(h, 404, {"error": {"message": f"no route {h.path}", "type": "not_found"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(h, 400, {"error": {"message": "the request body is not JSON", "type": "invalid_request"}})
            return
        with self._lock:
            self.requests.append(body)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.api_key is not None and not self._authorized(h.headers.get("Authorization") or ""):
                self._send(h, 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
                return
            if self.models is not None and body.get("model") not in self.models:
                self._send(h, 404, {"error": {"message": f"The model `{body.get('model')}` does not exist or you do "
                                              "not have access to it.", "type": "invalid_request_error",
                                              "code": "model_not_found"}})
                return
            fault = self._fault_for(body)
            if fault is not None and self._fail(h, fault):
                return
            if self.latency_s:
                time.sleep(self.latency_s)
            try:
                answer = fault.malformed if fault is not None else self.respond(body)
            except Exception as e:                         # a bug in the script: say so instead of dropping the line
                self._send(h, 500, {"error": {"message": f"respond() raised {type(e).__name__}: {e}",
                                              "type": "server_error"}})
                return
            if isinstance(answer, Fault):                  # the respond function scripts a failure itself
                if self._fail(h, answer):
                    return
                answer = answer.malformed
            scripted_lp = None
            if isinstance(answer, dict):
                answer, scripted_lp = answer["content"], answer.get("logprobs")
            self._send(h, 200, self._completion(body, answer, scripted_lp))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme == "Bearer":
            return value == self.api_key
        if scheme == "Basic":
            try:
                _, _, password = base64.b64decode(value).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return password == self.api_key
        return False

    def _fail(self, h: BaseHTTPRequestHandler, fault: Fault) -> bool:
        """Apply ``fault``: wait its delay, then answer its error (True) or leave a malformed answer to come."""
        if fault.delay_s:
            time.sleep(fault.delay_s)
        if fault.malformed is not None:
            return False
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        self._send(h, fault.status, fault.body or {"error": {"message": f"injected fault {fault.status}",
                                                             "type": "server_error"}}, headers)
        return True

    def _completion(self, body: dict, content: str, scripted_lp: list | None) -> dict:
        prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion = len(content.split())
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop", "logprobs": None}
        if body.get("logprobs") and self.logprobs:
            lp = scripted_lp if scripted_lp is not None else [
                {"token": t, "logprob": 0.0, "bytes": None,
                 "top_logprobs": [{"token": t, "logprob": 0.0, "bytes": None}][: body.get("top_logprobs") or 0]}
                for t in _tokens(content)]
            choice["logprobs"] = {"content": lp}
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "stand-in"), "choices": [choice],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128    # the default backlog of 5 drops connections when many clients open at once
    daemon_threads = True


def main(argv: Sequence[str] | None = None) -> None:
    """Serve :func:`~tl_modular.labeling.offline_chat_model` until interrupted:
    ``python -m tl_modular.labeling.testing_server --port 8765 --latency 0.2``, then point a labeler
    (or ``tl-modular analyze --labeler openai --base-url http://127.0.0.1:8765/v1``) at it."""
    import argparse

    from tl_modular.labeling._scripted import offline_chat_model

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free one)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args(argv)
    with ChatServer(offline_chat_model, latency_s=args.latency, port=args.port) as server:
        print(server.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
