"""A real OpenAI-compatible chat-completions server on loopback, with scripted answers and faults.

For tests (and for trying prompts) without a model or a network: ``ChatServer(respond)`` serves
``POST /v1/chat/completions`` on ``127.0.0.1`` from a thread pool, answering each request body with
``respond(body)`` after ``latency_s`` seconds, in the OpenAI response shape (``usage`` counted in
words, ``logprobs`` when asked). Faults are injected in order, each once, or only for matching
requests: HTTP errors with ``Retry-After``, malformed answers, slow responses.

It also serves the Batch API: ``/v1/files`` (multipart upload, ``GET .../content``) and
``/v1/batches`` (create, retrieve, list, cancel). A batch advances when it is retrieved (no clock:
tests are deterministic); its lines are answered by ``respond`` with the same per-request faults
(a line fault becomes a line of the error file), and :class:`BatchFault` scripts a batch that is
slow, fails, expires or is cancelled with part of its output.

>>> faults = [Fault(status=429, retry_after=1)]
>>> with ChatServer(lambda body: '{"label": "x"}', faults=faults) as server:          # doctest: +SKIP
...     client = openai.OpenAI(base_url=server.url, api_key="none")
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import itertools
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


@dataclass(kw_only=True)
class BatchFault:
    """How the next batch created ends (each fault used once, in order).

    Attributes:
        polls: Retrieves that answer ``in_progress`` (with growing ``request_counts``) before the end:
            a slow batch.
        status: The end: ``"completed"``, ``"failed"`` (no line answered; ``errors`` say why),
            ``"expired"`` or ``"cancelled"`` (the first ``done`` lines answered, the others in the error
            file as ``batch_expired`` / ``batch_cancelled``).
        done: Lines answered before an expiry or a cancellation.
        errors: The ``errors.data`` of a failed batch (default: one ``invalid_request`` error on line 1).
    """

    polls: int = 0
    status: str = "completed"
    done: int = 0
    errors: list[dict] | None = None

    def __post_init__(self) -> None:
        if self.status not in ("completed", "failed", "expired", "cancelled"):
            raise ValueError(f"BatchFault.status must be completed, failed, expired or cancelled, got {self.status!r}")
        if self.polls < 0 or self.done < 0:
            raise ValueError(f"BatchFault.polls and done must be >= 0, got polls={self.polls}, done={self.done}")


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
        faults: Injected failures, in order (chat requests and batch lines alike).
        batch_faults: How the batches created end, in order (:class:`BatchFault`); later ones complete.
        logprobs: Offer token log-probabilities when a request asks (False: a server that never does).
        api_key: When given, requests get 401 unless they carry it as ``Authorization: Bearer <api_key>``
            or as the password of HTTP Basic auth (what a client sends for ``https://user:KEY@host/v1``).
        models: When given, requests for another model get 404 ``model_not_found`` (as OpenAI answers).
        port: Port on 127.0.0.1 (0: any free one).

    Attributes:
        url: ``http://127.0.0.1:PORT/v1`` — pass as ``base_url``.
        requests: Every chat request body received (for assertions).
        batch_requests: Every batch line body answered (completed or failed, not expired or cancelled).
        calls: ``(method, path)`` of every HTTP request, in order.
        files, batches: What was uploaded and created, by id.
        max_in_flight: The most requests that were being handled at once.
    """

    def __init__(self, respond: Callable[[dict], str | dict | Fault] | None = None, *, latency_s: float = 0.0,
                 faults: Sequence[Fault] = (), logprobs: bool = True, api_key: str | None = None,
                 models: Sequence[str] | None = None, port: int = 0,
                 batch_faults: Sequence[BatchFault] = ()) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s}")
        bad = [f for f in faults if not isinstance(f, Fault)]
        if bad:
            raise TypeError(f"faults must be Fault objects, got {bad[0]!r}; e.g. Fault(status=429, retry_after=1)")
        self.respond = respond or (lambda body: "{}")
        self.latency_s = latency_s
        self.faults = list(faults)
        if any(not isinstance(f, BatchFault) for f in batch_faults):
            raise TypeError("batch_faults must be BatchFault objects, e.g. BatchFault(status='expired', done=2)")
        self.batch_faults = list(batch_faults)
        self.batch_requests: list[dict] = []
        self.calls: list[tuple[str, str]] = []
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self.logprobs = logprobs
        self.api_key = api_key
        self.models = None if models is None else list(models)
        self.port = port
        self.requests: list[dict] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._batch_lock = threading.Lock()
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

            def do_GET(self) -> None:  # noqa: N802
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
        path = h.path.partition("?")[0].rstrip("/").removeprefix("/v1")
        with self._lock:
            self.calls.append((h.command, path))
        if path.startswith(("/files", "/batches")):
            if self.api_key is not None and not self._authorized(h.headers.get("Authorization") or ""):
                self._send(h, 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
                return
            self._batch_api(h, path, raw)
            return
        if path != "/chat/completions" or h.command != "POST":
            self._send(h, 404, {"error": {"message": f"no route {h.command} {h.path}", "type": "not_found"}})
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

    def _answer(self, body: dict) -> tuple[int, dict]:
        """A chat request answered without HTTP: (status, completion or error body) — for batch lines."""
        fault = self._fault_for(body)
        try:
            answer = fault if fault is not None and fault.malformed is None else (
                fault.malformed if fault is not None else self.respond(body))
        except Exception as e:
            return 500, {"error": {"message": f"respond() raised {type(e).__name__}: {e}", "type": "server_error"}}
        if isinstance(answer, Fault):
            if answer.malformed is None:
                return answer.status, _error_body(answer)
            answer = answer.malformed
        scripted_lp = None
        if isinstance(answer, dict):
            answer, scripted_lp = answer["content"], answer.get("logprobs")
        return 200, self._completion(body, answer, scripted_lp)

    # --- the Batch API -------------------------------------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _batch_api(self, h: BaseHTTPRequestHandler, path: str, raw: bytes) -> None:
        parts = path.strip("/").split("/")
        with self._batch_lock:            # one batch call at a time: the state below is shared
            if parts == ["files"] and h.command == "POST":
                status, out = self._upload(h.headers.get("Content-Type", ""), raw)
            elif parts[0] == "files" and len(parts) == 3 and parts[2] == "content" and h.command == "GET":
                f = self.files.get(parts[1])
                if f is None:
                    status, out = 404, {"error": {"message": f"No such File object: {parts[1]}", "type": "not_found"}}
                else:
                    data = f["content"]
                    h.send_response(200)
                    h.send_header("Content-Type", "application/octet-stream")
                    h.send_header("Content-Length", str(len(data)))
                    h.end_headers()
                    h.wfile.write(data)
                    return
            elif parts[0] == "files" and len(parts) == 2 and h.command == "GET":
                f = self.files.get(parts[1])
                status, out = (200, self._file_object(parts[1])) if f is not None else (
                    404, {"error": {"message": f"No such File object: {parts[1]}", "type": "not_found"}})
            elif parts == ["batches"] and h.command == "POST":
                status, out = self._create_batch(json.loads(raw or b"{}"))
            elif parts == ["batches"] and h.command == "GET":
                data = sorted(self.batches.values(), key=lambda b: -b["created_at"])
                status, out = 200, {"object": "list", "data": [self._public(b) for b in data], "has_more": False,
                                    "first_id": data[0]["id"] if data else None,
                                    "last_id": data[-1]["id"] if data else None}
            elif parts[0] == "batches" and len(parts) in (2, 3) and parts[1] in self.batches:
                b = self.batches[parts[1]]
                if len(parts) == 3 and parts[2] == "cancel" and h.command == "POST":
                    if b["status"] in ("validating", "in_progress"):
                        b["status"] = "cancelling"
                        b["fault"] = BatchFault(status="cancelled", done=b["request_counts"]["completed"])
                    status, out = 200, self._public(b)
                elif len(parts) == 2 and h.command == "GET":
                    self._advance(b)
                    status, out = 200, self._public(b)
                else:
                    status, out = 404, {"error": {"message": f"no route {h.command} {h.path}", "type": "not_found"}}
            else:
                status, out = 404, {"error": {"message": f"no route {h.command} {h.path}", "type": "not_found"}}
        self._send(h, status, out)

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, dict]:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        fields: dict[str, Any] = {}
        for part in msg.iter_parts() if msg.is_multipart() else []:
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        if "file" not in fields or "purpose" not in fields:
            return 400, {"error": {"message": "a multipart upload needs the fields file and purpose",
                                   "type": "invalid_request_error"}}
        fid = self._new_id("file")
        self.files[fid] = {"filename": fields["file"][0] or "upload.jsonl", "content": fields["file"][1],
                           "purpose": fields["purpose"][1].decode(), "created_at": int(time.time())}
        return 200, self._file_object(fid)

    def _file_object(self, fid: str) -> dict:
        f = self.files[fid]
        return {"id": fid, "object": "file", "bytes": len(f["content"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed"}

    def _store(self, lines: list[dict], name: str) -> str | None:
        if not lines:
            return None
        fid = self._new_id("file")
        self.files[fid] = {"filename": name, "purpose": "batch_output", "created_at": int(time.time()),
                           "content": "".join(json.dumps(x) + "\n" for x in lines).encode()}
        return fid

    def _create_batch(self, req: dict) -> tuple[int, dict]:
        fid = req.get("input_file_id")
        if fid not in self.files:
            return 400, {"error": {"message": f"input_file_id {fid!r} is not an uploaded file",
                                   "type": "invalid_request_error"}}
        if req.get("completion_window") != "24h" or req.get("endpoint") != "/v1/chat/completions":
            return 400, {"error": {"message": "completion_window must be 24h and endpoint /v1/chat/completions",
                                   "type": "invalid_request_error"}}
        bid = self._new_id("batch")
        fault = self.batch_faults.pop(0) if self.batch_faults else BatchFault()
        lines = [json.loads(x) for x in self.files[fid]["content"].decode().splitlines() if x.strip()]
        now = int(time.time())
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": fid,
                             "completion_window": "24h", "status": "validating", "created_at": now + len(self.batches),
                             "expires_at": now + 86400, "metadata": req.get("metadata"), "output_file_id": None,
                             "error_file_id": None, "errors": None, "polls": 0,
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                             "lines": lines, "fault": fault}
        return 200, self._public(self.batches[bid])

    @staticmethod
    def _public(b: dict) -> dict:
        return {k: v for k, v in b.items() if k not in ("lines", "fault", "polls")}

    def _advance(self, b: dict) -> None:
        """One retrieve: a slow batch reports progress, then the batch ends as its fault says."""
        if b["status"] not in ("validating", "in_progress", "cancelling"):
            return
        fault, total = b["fault"], b["request_counts"]["total"]
        if b["status"] != "cancelling" and b["polls"] < fault.polls:
            b["polls"] += 1
            b["status"] = "in_progress"
            b["request_counts"]["completed"] = total * b["polls"] // (fault.polls + 1)
            return
        if fault.status == "failed":
            b.update(status="failed", failed_at=int(time.time()), request_counts={"total": total, "completed": 0,
                                                                                   "failed": 0},
                     errors={"object": "list", "data": fault.errors or [
                         {"code": "invalid_request", "line": 1, "message": "injected: the batch input is invalid",
                          "param": None}]})
            return
        n = total if fault.status == "completed" else min(fault.done, total)
        out, err = [], []
        for i, line in enumerate(b["lines"]):
            rid = f"batch_req_{b['id']}_{i}"
            if i >= n:
                code = "batch_expired" if fault.status == "expired" else "batch_cancelled"
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": code, "message": f"This request was not executed: the batch is "
                                                              f"{fault.status}."}})
                continue
            self.batch_requests.append(line["body"])
            status, body = self._answer(line["body"])
            item = {"id": rid, "custom_id": line["custom_id"], "error": None,
                    "response": {"status_code": status, "request_id": rid, "body": body}}
            (out if status == 200 else err).append(item)
        b.update(status=fault.status, output_file_id=self._store(out, f"{b['id']}_output.jsonl"),
                 error_file_id=self._store(err, f"{b['id']}_error.jsonl"),
                 request_counts={"total": total, "completed": len(out), "failed": len(err)})
        b[f"{fault.status}_at"] = int(time.time())

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


def _error_body(fault: Fault) -> dict | str:
    """The body a fault answers with: its own (JSON when it parses), else an OpenAI-style error."""
    if fault.body is None:
        return {"error": {"message": f"injected fault {fault.status}", "type": "server_error"}}
    try:
        return json.loads(fault.body)
    except json.JSONDecodeError:
        return fault.body


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
