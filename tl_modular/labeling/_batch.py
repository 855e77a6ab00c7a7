"""Bulk requests through the OpenAI Batch API: half the price, answered within 24 hours.

With ``ClientConfig(batch=True)`` (``OpenAILabeler(batch=True)``) the request layer does not send a
request that misses the cache: it hands the request body to a :class:`BatchQueue`, which gathers the
requests made at about the same time (the labels of every unit of a level, then their simulations),
writes them as JSONL — one line per request, ``custom_id`` the sha256 of its body, the body exactly
what the online path sends — uploads the file (``files.create(purpose="batch")``), creates a batch on
``/v1/chat/completions`` and polls it with exponential backoff (``batch_poll_s`` doubling up to
``batch_max_poll_s``; a progress bar on a terminal) until it ends. It then downloads the output and
error files and answers every waiting request; the request layer validates, repairs, counts and caches
these answers as it does online ones, so a re-run — batch or online — asks for nothing.

Resuming: the ids of each batch (input file, batch) are saved atomically in
``<cache_dir>/batches/<hash>.json`` after the upload and after the creation; a process that dies and
is started again with the same requests finds the file and waits for the same batch, so no request
is paid twice. A batch created just before the process died, with its id not yet saved, is found
again by its input file. The file goes once every answer of the batch is in the response cache.

How a batch ends:

- ``completed``: lines in the error file with a status that may pass (429, 5xx, none) are retried
  *online* — they are few, and a follow-up batch would keep the run waiting up to another 24 hours
  for them; lines refused with another 4xx fail their unit, as online.
- ``expired``: the answered lines are kept, the others go into a new batch (at most
  ``batch_resubmits`` times): there may be many, and a batch is half the price.
- ``cancelled`` (from the dashboard): the answered lines are kept, the others fail with
  reason ``"batch_cancelled"``; a re-run asks only for those.
- ``failed`` (the server rejected the input): every waiting request fails at once with
  :class:`~tl_modular.labeling.LLMUnavailable` naming the batch id and the server's errors.

>>> labeler = OpenAILabeler(model="gpt-4o-mini", batch=True)            # doctest: +SKIP
>>> labels = tlm.label(graph, model, tokens, labeler=labeler)           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tl_modular._io import ArtifactError, read_json, write_text
from tl_modular._redact import mask_secrets, redact

#: The endpoint every line is sent to.
ENDPOINT = "/v1/chat/completions"
#: Bytes of one input file at most (OpenAI takes up to 200 MB; a margin for the line framing).
MAX_FILE_BYTES = 190_000_000
#: Seconds an upload or download of a batch file may take (they reach hundreds of MB).
FILE_TIMEOUT_S = 600.0
#: Age after which a state file is dropped: OpenAI keeps a batch's files for 30 days.
STALE_S = 30 * 86400.0
#: Format version of a batch state file.
STATE_VERSION = 1
_ENDED = ("completed", "failed", "expired", "cancelled")


class BatchOutcome(Exception):
    """A request the batch did not answer; the request layer turns it into an ``LLMError``.

    Attributes:
        kind: ``"line"`` (the line came back with an error: ``status`` is its HTTP status, None when
            it has none), ``"failed"``, ``"cancelled"`` or ``"expired"`` (the batch ended so).
        batch_id: The batch.
    """

    def __init__(self, kind: str, batch_id: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.batch_id, self.status = kind, batch_id, status

    @property
    def retryable(self) -> bool:
        """A line error that may pass when sent again (timeouts, rate limits, server errors)."""
        return self.kind == "line" and (self.status is None or self.status in (408, 409, 429) or self.status >= 500)

    def again(self) -> BatchOutcome:
        """A fresh copy (one exception object must not be raised from two tasks)."""
        return BatchOutcome(self.kind, self.batch_id, str(self), status=self.status)


@dataclass
class _Job:
    """One batch: its saved state and the requests waiting for it."""

    path: Path
    state: dict[str, Any]
    open: set[str] = field(default_factory=set)     # answered ids whose answers are not yet consumed
    delivered: bool = False

    @property
    def batch_id(self) -> str | None:
        return self.state.get("batch_id")

    def save(self) -> None:
        write_text(self.path, mask_secrets(json.dumps(self.state, indent=1) + "\n"))

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


def poll_delays(first: float, cap: float) -> Iterator[float]:
    """Seconds between two status checks: ``first``, doubling, never above ``cap``.

    >>> from itertools import islice
    >>> list(islice(poll_delays(10, 60), 5))
    [10, 20, 40, 60, 60]
    """
    delay = first
    while True:
        yield min(delay, cap)
        delay = min(delay * 2, cap)


def custom_id(body: dict[str, Any]) -> str:
    """The line id of a request body: the sha256 of its canonical JSON (the same body, the same id)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class BatchQueue:
    """Gathers requests into Batch API jobs, saves their ids, polls them and hands out the answers.

    Args:
        host: The request layer (a ``ChatClient``): its ``config`` (``batch_*`` fields), ``endpoint``,
            ``_loop_state()`` (the openai client) and ``_api(what, call, *args, **kwargs)`` (one API
            call with retries and errors that say what to do).
        directory: Where the state files go (``<cache_dir>/batches``).

    Attributes:
        created: Ids of the batches this queue created, in order.
        resumed: Ids of saved batches it waited for again.
    """

    def __init__(self, host: Any, directory: str | Path) -> None:
        self.host = host
        self.directory = Path(directory)
        self.created: list[str] = []
        self.resumed: list[str] = []
        self._pending: dict[int, dict[str, tuple[dict, asyncio.Future]]] = {}
        self._grew: dict[int, asyncio.Event] = {}
        self._collector: dict[int, asyncio.Task] = {}
        self._tasks: dict[int, set[asyncio.Task]] = {}
        self._jobs: list[_Job] = []
        self._active: set[Path] = set()           # state files of the batches being waited for now
        self._inflight: dict[int, dict[str, asyncio.Future]] = {}    # submitted, not yet answered

    def __repr__(self) -> str:
        return f"BatchQueue(directory={redact(str(self.directory))!r}, created={self.created})"

    # --- gathering -----------------------------------------------------------------------------------

    async def send(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion (a dict) for ``body``, once its batch has answered; raises
        :class:`BatchOutcome` when the batch did not answer it."""
        loop = asyncio.get_running_loop()
        key = id(loop)
        pending = self._pending.setdefault(key, {})
        inflight = self._inflight.setdefault(key, {})
        if cid in pending:                        # the same request twice at once: one line answers both
            fut = pending[cid][1]
        elif cid in inflight:                     # ... or in a batch already submitted: wait for that one
            fut = inflight[cid]
        else:
            fut = loop.create_future()
            pending[cid] = (body, fut)
            self._grew.setdefault(key, asyncio.Event()).set()
            task = self._collector.get(key)
            if task is None or task.done():
                self._collector[key] = loop.create_task(self._collect(key))
        # shielded: a waiter that is cancelled leaves the batch (and the others waiting on it) alone
        return await asyncio.shield(fut)

    async def _collect(self, key: int) -> None:
        """Wait until no request has come for ``batch_collect_s``, then submit what came."""
        grew = self._grew[key]
        while True:
            grew.clear()
            try:
                await asyncio.wait_for(grew.wait(), self.host.config.batch_collect_s)
            except asyncio.TimeoutError:
                break
        items = self._pending.pop(key, {})
        inflight = self._inflight.setdefault(key, {})
        for k, (_, fut) in items.items():
            inflight[k] = fut
            fut.add_done_callback(lambda f, k=k: inflight.pop(k) if inflight.get(k) is f else None)
        if items:       # no await between the pop and the return: a later request starts a new collector
            task = asyncio.get_running_loop().create_task(self._settle(items))
            self._tasks.setdefault(key, set()).add(task)
            task.add_done_callback(self._tasks[key].discard)

    async def _settle(self, items: dict[str, tuple[dict, asyncio.Future]]) -> None:
        """:meth:`_flush`, and no waiter left waiting whatever happens."""
        try:
            await self._flush(items)
        except BaseException as e:
            _fail(items, e)
            if not isinstance(e, Exception):
                raise
        _fail(items, RuntimeError("the batch ended without answering this request (a bug: please report it)"))

    async def _flush(self, items: dict[str, tuple[dict, asyncio.Future]]) -> None:
        """Saved batches that hold some of ``items`` are waited for again; the rest go in new batches."""
        left = dict(items)
        groups: list[tuple[_Job | None, dict]] = []
        for job in self._saved():                 # newest first: a resubmitted line belongs to the newest
            mine = {k: left.pop(k) for k in job.state["custom_ids"] if k in left}
            if mine:
                groups.append((job, mine))
        most = self.host.config.batch_max_requests
        chunk: dict[str, tuple[dict, asyncio.Future]] = {}
        size = 0
        for k, item in left.items():          # batches of at most `most` lines and MAX_FILE_BYTES
            n = len(json.dumps(item[0], ensure_ascii=False).encode()) + 160
            if chunk and (len(chunk) >= most or size + n > MAX_FILE_BYTES):
                groups.append((None, chunk))
                chunk, size = {}, 0
            chunk[k], size = item, size + n
        if chunk:
            groups.append((None, chunk))
        await asyncio.gather(*(self._complete(job, mine, 0) for job, mine in groups))

    # --- one batch -----------------------------------------------------------------------------------

    async def _complete(self, job: _Job | None, items: dict[str, tuple[dict, asyncio.Future]], resubmits: int
                        ) -> None:
        try:
            if job is None:
                job = await self._submit(items)
                self._active.add(job.path)
            else:
                self._active.add(job.path)
                self.resumed.append(job.batch_id or job.state["input_file_id"])
                if job.batch_id is None:
                    await self._create(job, resume=True)
            self._jobs.append(job)
            batch = await self._wait(job)
            again = await self._deliver(job, batch, items)
        except BaseException as e:
            _fail(items, e)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            if job is not None:
                self._active.discard(job.path)
        if again:
            if resubmits >= self.host.config.batch_resubmits:
                for _, fut in again.values():
                    fut.set_exception(BatchOutcome(
                        "expired", job.batch_id or "", f"batch {job.batch_id} expired before answering this request "
                        f"(resubmitted {resubmits} time{'s' * (resubmits != 1)}); re-run to ask again, or raise "
                        "batch_resubmits"))
                return
            await self._complete(None, again, resubmits + 1)

    async def _submit(self, items: dict[str, tuple[dict, asyncio.Future]]) -> _Job:
        client, _ = self.host._loop_state()
        lines = [{"custom_id": k, "method": "POST", "url": ENDPOINT, "body": body} for k, (body, _) in items.items()]
        data = "".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")) + "\n" for x in lines).encode()
        name = hashlib.sha256(data).hexdigest()[:24]
        upload = await self.host._api("upload the batch input", client.files.create,
                                      file=(f"tl_modular-{name}.jsonl", data, "application/jsonl"), purpose="batch",
                                      timeout=max(FILE_TIMEOUT_S, self.host.config.timeout_s))
        job = _Job(self.directory / f"{name}.json",
                   {"version": STATE_VERSION, "endpoint": self.host.endpoint, "model": self.host.config.model,
                    "saved_at": time.time(), "input_file_id": upload.id, "batch_id": None,
                    "custom_ids": list(items)})
        job.save()                                # before the batch exists: a restart finds it by the file
        await self._create(job, resume=False)
        return job

    async def _create(self, job: _Job, *, resume: bool) -> None:
        client, _ = self.host._loop_state()
        batch = await self._find(job.state["input_file_id"]) if resume else None
        if batch is None:
            batch = await self.host._api("create the batch", client.batches.create,
                                         input_file_id=job.state["input_file_id"], endpoint=ENDPOINT,
                                         completion_window="24h", metadata={"created_by": "tl_modular"})
            self.created.append(batch.id)
        job.state["batch_id"] = batch.id
        job.save()

    async def _find(self, input_file_id: str) -> Any:
        """A batch already made from ``input_file_id`` (created before the process died), if any."""
        client, _ = self.host._loop_state()
        page = await self.host._api("list the batches", client.batches.list, limit=100)
        return next((b for b in page.data if b.input_file_id == input_file_id), None)

    async def _retrieve(self, batch_id: str) -> Any:
        client, _ = self.host._loop_state()
        return await self.host._api(f"check batch {batch_id}", client.batches.retrieve, batch_id)

    async def _wait(self, job: _Job) -> Any:
        """Poll until the batch ends (exponential backoff, bounded by ``batch_max_poll_s``)."""
        cfg = self.host.config
        delays = poll_delays(cfg.batch_poll_s, cfg.batch_max_poll_s)
        bar = tqdm(total=len(job.state["custom_ids"]), desc=f"batch {job.batch_id}", disable=None, leave=False)
        try:
            while True:
                batch = await self._retrieve(job.batch_id)
                counts = getattr(batch, "request_counts", None)
                if counts is not None:
                    bar.update(max(0, counts.completed + counts.failed - bar.n))
                if batch.status in _ENDED:
                    return batch
                await asyncio.sleep(next(delays))
        finally:
            bar.close()

    async def _lines(self, bid: str, file_id: str | None) -> dict[str, dict]:
        if not file_id:
            return {}
        client, _ = self.host._loop_state()
        content = await self.host._api(f"download file {file_id}", client.files.content, file_id,
                                       timeout=max(FILE_TIMEOUT_S, self.host.config.timeout_s))
        out = {}
        for i, raw in enumerate(content.text.splitlines(), 1):
            if raw.strip():
                try:
                    line = json.loads(raw)
                    out[line["custom_id"]] = line
                except (ValueError, KeyError, TypeError) as e:   # the answers cannot be matched to requests
                    raise BatchOutcome("failed", bid, f"line {i} of file {file_id} of batch {bid} is not a batch "
                                       f"result ({type(e).__name__}: {redact(str(e))[:200]}); its id stays saved: "
                                       "a re-run downloads it again") from None
        return out

    async def _deliver(self, job: _Job, batch: Any, items: dict[str, tuple[dict, asyncio.Future]]
                       ) -> dict[str, tuple[dict, asyncio.Future]]:
        """Answer the waiting requests from the ended batch; returns those to resubmit (expired)."""
        bid = batch.id
        if batch.status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            said = "; ".join(f"line {e.line}: {e.code}: {e.message}" if e.line is not None else f"{e.code}: {e.message}"
                             for e in errors[:5]) or "the server gave no reason"
            job.forget()                          # nothing of it will come: a re-run submits anew
            failed = BatchOutcome("failed", bid, f"batch {bid} failed: {redact(said)} — no request of it was "
                                                 "answered; fix the cause and re-run (a new batch is created)")
            for _, fut in items.values():
                if not fut.done():
                    fut.set_exception(failed.again())
            return {}
        lines = await self._lines(bid, batch.output_file_id)
        lines.update(await self._lines(bid, batch.error_file_id))
        again = {}
        for k, (_, fut) in items.items():
            if fut.done():
                continue
            line = lines.get(k) or {}
            response = line.get("response")
            error = line.get("error") or {}
            if response is not None and response.get("status_code") == 200:
                job.open.add(k)
                fut.set_result(response["body"])
            elif batch.status == "expired" and response is None:
                again[k] = items[k]
            elif batch.status == "cancelled" and response is None:
                job.open.add(k)
                fut.set_exception(BatchOutcome("cancelled", bid, f"batch {bid} was cancelled before answering this "
                                                                 "request; re-run to ask for it again"))
            else:
                job.open.add(k)
                status = response.get("status_code") if response is not None else None
                said = _said(response.get("body") if response is not None else None) or error.get("message") \
                    or error.get("code") or "no line in the output or error file"
                fut.set_exception(BatchOutcome("line", bid, f"batch {bid} answered this request with "
                                                            f"{f'HTTP {status}' if status else 'an error'}: "
                                                            f"{redact(said)}", status=status))
        job.delivered = True
        self._drop_if_done(job)
        return again

    # --- state files ---------------------------------------------------------------------------------

    def _saved(self) -> list[_Job]:
        """Saved batches of this endpoint and model not being waited for now, newest first."""
        if not self.directory.is_dir():
            return []
        jobs = []
        for path in self.directory.glob("*.json"):
            if path in self._active:
                continue
            try:
                state = read_json(path)
            except (ArtifactError, OSError, ValueError):
                continue                          # half-written by hand or damaged: not ours to resume
            saved_at = state.get("saved_at") if isinstance(state, dict) else None
            if isinstance(saved_at, (int, float)) and time.time() - saved_at > STALE_S:
                path.unlink(missing_ok=True)      # its batch and files are gone from the server by now
                continue
            if (isinstance(state, dict) and state.get("version") == STATE_VERSION
                    and state.get("endpoint") == self.host.endpoint and state.get("model") == self.host.config.model
                    and state.get("input_file_id") and isinstance(state.get("custom_ids"), list)):
                jobs.append(_Job(path, state))
        return sorted(jobs, key=lambda j: -float(j.state.get("saved_at", 0)))

    def consumed(self, ids: list[str]) -> None:
        """The answers to ``ids`` are in the response cache (or their failure was reported): a batch all
        of whose answers are consumed no longer needs its state file."""
        for job in self._jobs:
            if job.open.intersection(ids):
                job.open.difference_update(ids)
                self._drop_if_done(job)

    def _drop_if_done(self, job: _Job) -> None:
        if job.delivered and not job.open:
            job.forget()

    async def aclose(self) -> None:
        """Stop this event loop's gathering and polling (saved batches stay resumable)."""
        key = id(asyncio.get_running_loop())
        tasks = [t for t in [self._collector.pop(key, None), *self._tasks.pop(key, ())] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, fut in self._pending.pop(key, {}).values():
            fut.cancel()
        self._grew.pop(key, None)
        self._inflight.pop(key, None)


def _said(body: Any) -> str | None:
    """The message of an OpenAI-style error body."""
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
        return str(msg)[:300] if msg else None
    return None


def _fail(items: dict[str, tuple[dict, asyncio.Future]], e: BaseException) -> None:
    """End the waits of ``items`` not yet answered with ``e`` (cancelled with it when it is a cancellation)."""
    for _, fut in items.values():
        if not fut.done():
            fut.cancel() if isinstance(e, asyncio.CancelledError) else fut.set_exception(_fresh(e))


def _fresh(e: BaseException) -> BaseException:
    """A copy of ``e`` for each waiter, where it can be made (the same object raised in many tasks
    grows one traceback)."""
    if isinstance(e, BatchOutcome):
        return e.again()
    again = getattr(e, "again", None)
    return again() if callable(again) else e
