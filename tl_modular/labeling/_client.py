"""The request layer every LLM call of the labeling goes through.

One :class:`ChatClient` wraps an ``openai.AsyncOpenAI`` client (any OpenAI-compatible server) and
adds what a long labeling run needs: retries with exponential backoff and full jitter that honour
``Retry-After`` on 429/503, 5xx, connection errors and timeouts; a limit on requests in flight; a
persistent content-addressed cache of valid answers (a re-run costs nothing, an interrupted run
resumes); token and cost accounting from ``usage`` with a budget that stops cleanly; JSON-schema
validation of every answer with one repair request. The API key is never part of a cache key, a
cache file, an exception, a log line or a repr (``tl_modular._redact``): credentials inside
``base_url`` (``https://user:KEY@proxy/v1``) are sent as HTTP Basic auth and shown as ``***``.

With ``batch=True`` the requests that miss the cache go through the OpenAI Batch API instead
(:mod:`tl_modular.labeling._batch`: half the price, answered within 24 hours, resumable); the
answers are validated, repaired, counted and cached the same way.

Failures that retrying cannot fix (no key, a key the server refuses, an unknown model or route, a
server that cannot be reached after the retries) raise :class:`LLMUnavailable`, and once one is
seen every further request of the client fails with it at once, without being sent.

>>> client = ChatClient(ClientConfig(model="gpt-4o-mini", cache_dir="llm_cache"))      # doctest: +SKIP
>>> reply = client.request_sync([{"role": "user", "content": "..."}], schema, name="answer")  # doctest: +SKIP
>>> reply.data, reply.usage, client.usage                                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tl_modular._aio import run_sync
from tl_modular._io import ArtifactError, read_json, write_text
from tl_modular._redact import mask_secrets, redact, redact_url, register
from tl_modular.labeling._batch import BatchOutcome, BatchQueue, custom_id

#: Set to 1 to switch off the default response cache (an explicit ``cache_dir`` still works).
NO_CACHE_ENV = "TL_MODULAR_NO_LLM_CACHE"


def default_cache_dir() -> Path | None:
    """The user's LLM response cache: ``$XDG_CACHE_HOME/tl_modular/llm`` (else ``~/.cache/tl_modular/llm``).

    None when ``$TL_MODULAR_NO_LLM_CACHE`` is ``1``. Like the Hugging Face caches, one folder per user,
    shared by every run and notebook: entries are keyed by the request's content (never the key).

    >>> default_cache_dir()                                  # doctest: +SKIP
    PosixPath('/home/me/.cache/tl_modular/llm')
    """
    if os.environ.get(NO_CACHE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tl_modular" / "llm"


#: Format version of a cache entry; entries of another version are asked again.
CACHE_VERSION = 1


class LLMError(RuntimeError):
    """A request failed for good (after its retries, or at once for errors a retry cannot fix).

    Attributes:
        reason: Why, as a short code: ``"server_error"`` (5xx after the retries), ``"rate_limited"``
            (429), ``"timeout"``, ``"connection"``, ``"refused"`` (another 4xx), ``"invalid_answer"``,
            ``"budget"``; for :class:`LLMUnavailable` ``"no_key"``, ``"auth"``, ``"not_found"``,
            ``"unreachable"``.
    """

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None, endpoint: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.endpoint = endpoint


class LLMUnavailable(LLMError):
    """No request can succeed: no key, a key the server refuses (401/403), an unknown model or
    route (404), a server that cannot be reached after the retries, or one that refuses every
    request. Retrying will not help; the message says what to change."""


class BudgetExceeded(LLMError):
    """The budget is spent: no further request is sent."""

    reason = "budget"


class InvalidAnswer(LLMError):
    """The answer did not match its schema, even after one repair request."""

    reason = "invalid_answer"


#: Human words for :attr:`LLMError.reason` (warnings, ``repr(Labels)``).
REASONS = {"server_error": "server error", "rate_limited": "rate limited", "timeout": "timed out",
           "connection": "connection failed", "refused": "request refused", "invalid_answer": "invalid answer",
           "budget": "budget spent", "no_key": "no API key", "auth": "API key refused",
           "not_found": "model or route not found", "unreachable": "server unreachable", "error": "error",
           "batch_failed": "batch failed", "batch_cancelled": "batch cancelled", "batch_expired": "batch expired"}


@dataclass(kw_only=True)
class ClientConfig:
    """Where to send requests and how carefully.

    Attributes:
        model: The chat model.
        base_url: An OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp); None for OpenAI.
        api_key: The key; None reads ``$OPENAI_API_KEY``. Never shown (``repr=False``).
        max_concurrency: Requests in flight at once.
        max_retries: Retries per request after the first attempt.
        backoff_s, max_backoff_s: Exponential backoff base and cap (full jitter).
        timeout_s: Per attempt.
        cache_dir: Folder of the content-addressed response cache; None or False for no cache here
            (:class:`~tl_modular.labeling.OpenAILabeler` fills None with :func:`default_cache_dir`).
        budget_usd, max_total_tokens: Stop before a request once spent cost / tokens reach these.
        price_per_mtok_input, price_per_mtok_output: USD per million prompt / completion tokens.
        temperature, seed: Sampling settings (part of the cache key).
        batch: Send the requests that miss the cache through the OpenAI Batch API (needs a cache:
            the batch ids are saved there so that a restarted run resumes the same batch).
        batch_poll_s, batch_max_poll_s: First wait between two status checks of a batch, doubling up to this.
        batch_collect_s: Requests made within this many seconds of each other go into one batch.
        batch_max_requests: Lines per batch at most (OpenAI allows 50,000).
        batch_resubmits: How often the unanswered lines of an expired batch are submitted again.
        batch_price_factor: Batch price over the online price (OpenAI: half).
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 16
    max_retries: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    cache_dir: str | os.PathLike | bool | None = None
    budget_usd: float | None = None
    max_total_tokens: int | None = None
    price_per_mtok_input: float = 0.15
    price_per_mtok_output: float = 0.60
    temperature: float = 0.0
    seed: int | None = 0
    batch: bool = False
    batch_poll_s: float = 10.0
    batch_max_poll_s: float = 600.0
    batch_collect_s: float = 0.5
    batch_max_requests: int = 50_000
    batch_resubmits: int = 2
    batch_price_factor: float = 0.5

    def __repr__(self) -> str:                    # the dataclass repr, minus the key (also inside base_url)
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return f"ClientConfig({redact(shown, self.api_key)})"

    def __post_init__(self) -> None:
        register(self.api_key)                     # replaced wherever tl_modular shows or writes text
        if self.base_url is not None and not isinstance(self.base_url, str):
            raise TypeError(f"base_url must be a string URL, got {type(self.base_url).__name__}")
        if not self.model:
            raise ValueError("ClientConfig.model must name a chat model")
        if not isinstance(self.batch, bool):
            raise TypeError(f"batch must be True or False, got {self.batch!r}")
        for name in ("max_concurrency", "max_retries", "max_total_tokens", "seed", "batch_max_requests",
                     "batch_resubmits"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.batch_max_requests < 1 or self.batch_resubmits < 0:
            raise ValueError(f"batch_max_requests must be >= 1 and batch_resubmits >= 0, got "
                             f"{self.batch_max_requests} and {self.batch_resubmits}")
        if self.batch_poll_s <= 0 or self.batch_max_poll_s < self.batch_poll_s:
            raise ValueError(f"batch_poll_s must be > 0 and batch_max_poll_s >= batch_poll_s, got "
                             f"{self.batch_poll_s} and {self.batch_max_poll_s}")
        for name in ("backoff_s", "max_backoff_s", "price_per_mtok_input", "price_per_mtok_output", "temperature",
                     "batch_collect_s", "batch_price_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0, got {self.budget_usd}")
        if self.max_total_tokens is not None and self.max_total_tokens < 0:
            raise ValueError(f"max_total_tokens must be >= 0, got {self.max_total_tokens}")


@dataclass
class Usage:
    """Requests and spending (per reply, or running totals)."""

    requests: int = 0
    cached: int = 0
    retries: int = 0
    failures: int = 0
    repairs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __iadd__(self, other: Usage) -> Usage:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def __add__(self, other: Usage) -> Usage:
        out = Usage(**self.to_json())
        out += other
        return out


@dataclass
class Reply:
    """A validated answer."""

    data: dict[str, Any]
    logprobs: list[dict[str, Any]] | None
    usage: Usage
    cached: bool


# --- JSON-schema validation (the subset the labeling schemas use) ------------------------------------

_CHECKS = {"object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
           "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
           "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
           "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
           "null": lambda v: v is None}


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> str | None:
    """The first way ``value`` breaks ``schema``, or None when it fits."""
    kind = schema.get("type")
    for k in kind if isinstance(kind, list) else [kind]:
        if k is not None and k not in _CHECKS:
            raise ValueError(f"unsupported JSON-schema type {k!r} at {path}; use one of {sorted(_CHECKS)}")
    if isinstance(kind, list):                    # ["number", "null"]: the first type that fits decides
        kind = next((k for k in kind if _CHECKS[k](value)), None)
        if kind is None:
            return f"{path} must be one of the types {schema['type']}, got {type(value).__name__}"
    if kind is not None and not _CHECKS[kind](value):
        return f"{path} must be of type {kind}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {schema['enum']}"
    if kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path} must be <= {schema['maximum']}, got {value}"
    if kind == "string":
        if len(value) < schema.get("minLength", 0):
            return f"{path} must have at least {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path} must have at most {schema['maxLength']} characters"
    if kind == "array":
        if len(value) < schema.get("minItems", 0):
            return f"{path} must have at least {schema['minItems']} items, got {len(value)}"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{path} must have at most {schema['maxItems']} items, got {len(value)}"
        for i, item in enumerate(value):
            if "items" in schema and (err := validate(item, schema["items"], f"{path}[{i}]")):
                return err
    if kind == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{path} is missing the required field {key!r}"
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                return f"{path} has unexpected fields {extra}"
        for key, sub in props.items():
            if key in value and (err := validate(value[key], sub, f"{path}.{key}")):
                return err
    return None


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    raw = headers.get("retry-after") if headers is not None else None
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):               # neither seconds nor a date: ignore it, back off as usual
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


class ChatClient:
    """Chat completions with JSON answers, retries, a cache, a budget and validation (module docs).

    Args:
        config: Where and how to send requests.
        client: A ready ``openai.AsyncOpenAI`` client; by default one is built from ``config``
            (its own retries switched off: this layer retries, so it sees every ``Retry-After``).
    """

    def __init__(self, config: ClientConfig | None = None, *, client: Any = None) -> None:
        self.config = config or ClientConfig()
        self._given = client
        self._clients: dict[int, Any] = {}      # one openai client per event loop (httpx pools are loop-bound)
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self.usage = Usage()
        where = self.config.cache_dir
        self._cache = None if where is None or where is False else Path(where)
        self._answered = False                  # a response (any status) came from the server at least once
        self._succeeded = False                 # a request succeeded at least once
        self._refusals = 0                      # non-retryable 4xx answers while nothing has succeeded
        self._unavailable: LLMUnavailable | None = None   # set once: every later request fails with it
        self.batch: BatchQueue | None = None
        if self.config.batch:
            if self._cache is None:
                raise ValueError("batch=True needs a response cache (cache_dir=, and $TL_MODULAR_NO_LLM_CACHE unset): "
                                 "the batch ids are saved there so that a restarted run resumes the same batch, and "
                                 "the answers are kept there")
            self.batch = BatchQueue(self, self._cache / "batches")

    def __repr__(self) -> str:
        batch = ", batch=True" if self.config.batch else ""
        return f"ChatClient(model={self.config.model!r}, base_url={self._public_url()!r}{batch})"

    def _loop_state(self) -> tuple[Any, asyncio.Semaphore]:
        loop = id(asyncio.get_running_loop())
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.config.max_concurrency)
        if self._given is not None:
            return self._given, self._semaphores[loop]
        if loop not in self._clients:
            import openai

            key = self._key()
            if not key:
                raise self._fail_for_good(LLMUnavailable(
                    "no API key: set $OPENAI_API_KEY, pass api_key=, or api_key='none' for a local server that takes "
                    f"none (endpoint {self.endpoint})", reason="no_key", endpoint=self.endpoint))
            register(key)
            url, auth = _split_credentials(self.config.base_url)
            # credentials inside base_url travel as HTTP Basic auth, never in a URL the HTTP stack logs
            http = openai.DefaultAsyncHttpxClient(auth=auth) if auth is not None else None
            self._clients[loop] = openai.AsyncOpenAI(api_key=key, base_url=url, max_retries=0,
                                                     timeout=self.config.timeout_s, http_client=http)
        return self._clients[loop], self._semaphores[loop]

    def _key(self) -> str | None:
        return self.config.api_key or os.environ.get("OPENAI_API_KEY")

    def _public_url(self) -> str | None:
        """``base_url`` without credentials (``user:password@``, or the key itself in a query string)."""
        return redact_url(self.config.base_url, self._key())

    @property
    def endpoint(self) -> str:
        """The server asked, fit to show (no credentials)."""
        return self._public_url() or "https://api.openai.com/v1"

    def _fail_for_good(self, error: LLMUnavailable) -> LLMUnavailable:
        """Remember ``error``: every later request fails with it at once, without being sent."""
        if self._unavailable is None:
            self._unavailable = error
        return error

    # --- cache ---------------------------------------------------------------------------------------

    def cache_key(self, messages: list[dict], schema: dict, name: str, logprobs: bool, top_logprobs: int,
                  max_tokens: int) -> str:
        """sha256 over everything that shapes the answer (never the key)."""
        # who asks (credentials in the URL, the key) does not change the answer: not part of the key
        url = self.config.base_url
        base = redact_url(_split_credentials(url)[0], self._key()) if url else "openai"
        doc = {"model": self.config.model, "base_url": base, "messages": messages, "schema": schema, "name": name,
               "temperature": self.config.temperature, "seed": self.config.seed, "logprobs": logprobs,
               "top_logprobs": top_logprobs if logprobs else None, "max_tokens": max_tokens}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self._cache is None else self._cache / key[:2] / f"{key}.json"

    # --- requests ------------------------------------------------------------------------------------

    def _check_budget(self) -> None:
        c, u = self.config, self.usage
        if c.budget_usd is not None and u.cost_usd >= c.budget_usd:
            raise BudgetExceeded(f"the budget of ${c.budget_usd:.6g} is spent (${u.cost_usd:.6g} over "
                                 f"{u.requests} requests, {u.prompt_tokens + u.completion_tokens} tokens); raise "
                                 "budget_usd to go on — answers already cached stay free")
        if c.max_total_tokens is not None and u.prompt_tokens + u.completion_tokens >= c.max_total_tokens:
            raise BudgetExceeded(f"the token budget of {c.max_total_tokens} is spent "
                                 f"({u.prompt_tokens + u.completion_tokens} tokens over {u.requests} requests, "
                                 f"${u.cost_usd:.6g}); raise max_total_tokens to go on")

    async def _send(self, messages: list[dict], schema: dict, name: str, logprobs: bool, top_logprobs: int,
                    max_tokens: int, usage: Usage, ids: list[str] | None = None) -> tuple[str, list | None]:
        """One chat completion with retries; returns the content and logprobs, counting into ``usage``.
        In batch mode the batch line ids used are appended to ``ids``."""
        import openai

        cfg = self.config
        # timeout per call, so that a client passed in also honours timeout_s
        kwargs: dict[str, Any] = {"model": cfg.model, "messages": messages, "max_tokens": max_tokens,
                                  "temperature": cfg.temperature, "timeout": cfg.timeout_s,
                                  "response_format": {"type": "json_schema",
                                                      "json_schema": {"name": name, "schema": schema, "strict": True}}}
        if cfg.seed is not None:
            kwargs["seed"] = cfg.seed
        if logprobs:
            kwargs["logprobs"], kwargs["top_logprobs"] = True, top_logprobs
        if self.batch is not None:
            answer = await self._send_batch({k: v for k, v in kwargs.items() if k != "timeout"}, usage, ids)
            if answer is not None:
                return answer                 # else a line error that may pass: retried online below
        client, semaphore = self._loop_state()
        attempt = 0
        connection_only = True                # every attempt of this request failed to connect
        while True:
            wait: float | None = None
            try:
                async with semaphore:
                    if self._unavailable is not None:   # settled by another request: do not send this one
                        raise _again(self._unavailable)
                    self._check_budget()      # checked in the queue's order: what waited sees what was spent
                    response = await client.chat.completions.create(**kwargs)
            except openai.APIStatusError as e:
                self._answered = True
                connection_only = False
                status = e.status_code
                if status not in (408, 409, 429) and status < 500:
                    usage.failures += 1
                    self.usage.failures += 1
                    raise self._refused(status, _message(e)) from None
                error, reason = f"HTTP {status}", "rate_limited" if status == 429 else "server_error"
                if status in (429, 503):
                    wait = _retry_after(getattr(e.response, "headers", None))
            except openai.APITimeoutError:
                connection_only = False
                error, reason = "timed out", "timeout"
            except openai.APIConnectionError as e:
                error, reason = f"cannot connect ({_cause(e)})", "connection"
            else:
                self._answered = self._succeeded = True
                return self._take(response, usage)
            if attempt >= cfg.max_retries:
                usage.failures += 1
                self.usage.failures += 1
                if connection_only and not self._answered:       # never reached it: no request will
                    raise self._fail_for_good(LLMUnavailable(
                        f"cannot reach the server at {self.endpoint} ({attempt + 1} attempts, last: {redact(error)}): "
                        "check base_url, that the server is running, and the network", reason="unreachable",
                        endpoint=self.endpoint))
                raise LLMError(f"the request failed {attempt + 1} times (last: {redact(error)}); the server at "
                               f"{self.endpoint} may be down or rate-limiting — try later, lower max_concurrency or "
                               "raise max_retries", reason=reason, endpoint=self.endpoint)
            attempt += 1
            usage.retries += 1
            self.usage.retries += 1
            backoff = random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)))
            await asyncio.sleep(min(cfg.max_backoff_s, max(backoff, wait or 0.0)))

    def _take(self, response: Any, usage: Usage, price_factor: float = 1.0) -> tuple[str, list | None]:
        """Content and plain logprobs of a chat completion (the openai object, or a batch line's dict),
        its tokens and cost counted into ``usage`` and the running totals."""
        cfg = self.config
        u = _get(response, "usage")
        p, c = (_get(u, "prompt_tokens") or 0, _get(u, "completion_tokens") or 0) if u else (0, 0)
        spent = Usage(requests=1, prompt_tokens=p, completion_tokens=c,
                      cost_usd=price_factor * (p * cfg.price_per_mtok_input + c * cfg.price_per_mtok_output) / 1e6)
        usage += spent
        self.usage += spent
        choice = _get(response, "choices")[0]
        lp = _get(choice, "logprobs")
        content = _get(lp, "content") if lp is not None else None
        plain = [_plain_logprob(x) for x in content] if content else None
        return _get(_get(choice, "message"), "content") or "", plain

    async def _send_batch(self, body: dict[str, Any], usage: Usage, ids: list[str] | None
                          ) -> tuple[str, list | None] | None:
        """``body`` answered through the Batch API; None for a line error that may pass online."""
        if self.batch is None:            # an internal call error, not the user's: say so under python -O too
            raise RuntimeError("_send_batch needs a client made with batch=True")
        if self._unavailable is not None:
            raise _again(self._unavailable)
        self._check_budget()                  # checked at submission: a batch's cost is known once it ends
        cid = custom_id(body)
        try:
            response = await self.batch.send(cid, body)
        except BatchOutcome as e:
            if ids is not None:
                ids.append(cid)
            if e.retryable:                   # few lines: online now beats another batch of up to 24 h
                usage.retries += 1
                self.usage.retries += 1
                return None
            usage.failures += 1
            self.usage.failures += 1
            if e.kind == "line":
                raise self._refused(e.status or 400, str(e)) from None
            if e.kind == "failed":
                raise _again(self._fail_for_good(LLMUnavailable(str(e), reason="batch_failed",
                                                                endpoint=self.endpoint))) from None
            raise LLMError(str(e), reason=f"batch_{e.kind}", endpoint=self.endpoint) from None
        except LLMUnavailable as e:           # one error object reached every waiter: each raises its own
            raise _again(e) from None
        except LLMError as e:
            raise LLMError(str(e), reason=e.reason, endpoint=e.endpoint) from None
        if ids is not None:
            ids.append(cid)
        self._answered = self._succeeded = True
        return self._take(response, usage, self.config.batch_price_factor)

    async def _api(self, what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """One Files/Batches API call (``what`` says which, for messages), with the retries of a request."""
        import openai

        cfg = self.config
        attempt = 0
        while True:
            wait: float | None = None
            try:
                return await call(*args, **{"timeout": cfg.timeout_s, **kwargs})
            except openai.APIStatusError as e:
                self._answered = True
                status = e.status_code
                if status not in (408, 409, 429) and status < 500:
                    text = redact(_message(e), self._key())
                    if status == 404:
                        where = self.batch.directory if self.batch is not None else "the cache"
                        raise _again(self._fail_for_good(LLMUnavailable(
                            f"the server at {self.endpoint} could not {what} (HTTP 404: {text}) — it may have no "
                            "Batch API (local servers such as vLLM and Ollama answer online requests: use "
                            "batch=False), or a saved batch belongs to another server or account (delete its file "
                            f"under {where} to submit anew)", reason="not_found", endpoint=self.endpoint))) from None
                    raise self._refused(status, f"could not {what}: {text}") from None
                error, reason = f"HTTP {status}", "rate_limited" if status == 429 else "server_error"
                if status in (429, 503):
                    wait = _retry_after(getattr(e.response, "headers", None))
            except openai.APITimeoutError:
                error, reason = "timed out", "timeout"
            except openai.APIConnectionError as e:
                error, reason = f"cannot connect ({_cause(e)})", "connection"
            if attempt >= cfg.max_retries:
                raise LLMError(f"could not {what} at {self.endpoint} after {attempt + 1} attempts (last: "
                               f"{redact(error)}); the batch ids are saved — re-run later to resume the same batch",
                               reason=reason, endpoint=self.endpoint)
            attempt += 1
            backoff = random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1)))
            await asyncio.sleep(min(cfg.max_backoff_s, max(backoff, wait or 0.0)))

    def _refused(self, status: int, text: str) -> LLMError:
        """The error for a 4xx that retrying will not change (the server's message, redacted)."""
        text = redact(text, self._key())            # a server that echoes the key does not leak it here
        where = f"the server at {self.endpoint} refused the request (HTTP {status})"
        if status in (401, 403):
            return self._fail_for_good(LLMUnavailable(
                f"{where} — check the API key ($OPENAI_API_KEY, api_key=, or the credentials in base_url): {text}",
                reason="auth", endpoint=self.endpoint))
        if status == 404:
            return self._fail_for_good(LLMUnavailable(
                f"{where} — check the model name ({self.config.model!r}) and that base_url ends where the server's "
                f"OpenAI API starts (often /v1): {text}", reason="not_found", endpoint=self.endpoint))
        if not self._succeeded:
            self._refusals += 1
        if not self._succeeded and self._refusals >= 3:    # the first answers all refused: the next would too
            return self._fail_for_good(LLMUnavailable(
                f"{where} {self._refusals} times and answered nothing else: {text} — the server may not support "
                "JSON-schema answers (response_format), seed or logprobs; see its documentation", reason="refused",
                endpoint=self.endpoint))
        return LLMError(f"{where}: {text}", reason="refused", endpoint=self.endpoint)

    async def request(self, messages: list[dict], schema: dict, *, name: str, logprobs: bool = False,
                      top_logprobs: int = 5, max_tokens: int = 1024) -> Reply:
        """A JSON answer to ``messages`` that fits ``schema`` (cached, retried, validated, repaired once)."""
        key = self.cache_key(messages, schema, name, logprobs, top_logprobs, max_tokens)
        path = self._cache_path(key)
        if path is not None and path.exists():
            try:
                entry = read_json(path)
                if entry.get("version") == CACHE_VERSION and validate(entry["data"], schema) is None:
                    self.usage.cached += 1
                    return Reply(entry["data"], entry.get("logprobs"), Usage(cached=1), cached=True)
            except ArtifactError as e:            # a damaged entry is asked again and rewritten
                warnings.warn(f"{e} (the LLM cache entry is asked again and rewritten)", RuntimeWarning, stacklevel=2)
            except (OSError, ValueError, KeyError, AttributeError):
                pass                              # an entry of another shape: asked again and rewritten
        usage = Usage()
        ids: list[str] = []                       # batch lines used: their state file goes once all are consumed
        try:
            data, lp = await self._ask(messages, schema, name, logprobs, top_logprobs, max_tokens, usage, ids)
        except LLMError:
            if self.batch is not None:            # reported: a re-run asks again, as online
                self.batch.consumed(ids)
            raise
        if path is not None:
            # compact JSON: indenting switches json to its pure-Python encoder, ~30 ms for a logprobs entry
            entry = {"version": CACHE_VERSION, "key": key, "model": self.config.model, "name": name, "data": data,
                     "logprobs": lp, "usage": usage.to_json()}
            text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
            write_text(path, mask_secrets(text, self._key()))     # a server that echoes the key: not stored
        if self.batch is not None:
            self.batch.consumed(ids)
        return Reply(data, lp, usage, cached=False)

    async def _ask(self, messages: list[dict], schema: dict, name: str, logprobs: bool, top_logprobs: int,
                   max_tokens: int, usage: Usage, ids: list[str]) -> tuple[Any, list | None]:
        """The parsed, valid answer and its logprobs (one repair request when the first is invalid)."""
        content, lp = await self._send(messages, schema, name, logprobs, top_logprobs, max_tokens, usage, ids)
        data, error = _parse(content, schema)
        if error is not None:                     # one repair: show the model its answer and what is wrong
            usage.repairs += 1
            self.usage.repairs += 1
            repair = [*messages, {"role": "assistant", "content": content},
                      {"role": "user", "content": f"That answer is invalid: {error}. Reply with the corrected "
                                                  "JSON only, matching the schema."}]
            content, lp = await self._send(repair, schema, name, logprobs, top_logprobs, max_tokens, usage, ids)
            data, error = _parse(content, schema)
            if error is not None:
                usage.failures += 1
                self.usage.failures += 1
                raise InvalidAnswer(f"the {name} answer is invalid after one repair: {redact(error, self._key())}",
                                    endpoint=self.endpoint)
        return data, lp

    async def aclose(self) -> None:
        """Close the connections this event loop opened (before the loop ends); batches in flight stop
        being polled (their ids stay saved: a re-run resumes them)."""
        if self.batch is not None:
            await self.batch.aclose()
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        self._semaphores.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.close()

    def request_sync(self, messages: list[dict], schema: dict, **kwargs: Any) -> Reply:
        """:meth:`request` from sync code (also inside a running event loop, through a thread)."""
        return run_sync(_closing(self, self.request(messages, schema, **kwargs)))


async def _closing(obj: Any, coro: Any) -> Any:
    """Await ``coro``, then let ``obj`` close what it opened in this event loop (HTTP connections
    must close before ``asyncio.run`` ends the loop)."""
    try:
        return await coro
    finally:
        close = getattr(obj, "aclose", None)
        if close is not None:
            await close()


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` of a dict (a batch line), else the attribute (an openai object); None when absent."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _plain_logprob(item: Any) -> dict[str, Any]:
    """``{token, logprob, top_logprobs: [{token, logprob}]}`` from the openai object (or a dict)."""
    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    top = [{"token": get(t, "token"), "logprob": get(t, "logprob")} for t in get(item, "top_logprobs") or []]
    return {"token": get(item, "token"), "logprob": get(item, "logprob"), "top_logprobs": top}


def _parse(content: str, schema: dict) -> tuple[Any, str | None]:
    text = content.strip()
    if text.startswith("```"):                    # tolerate a fenced answer
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at character {e.pos})"
    return data, validate(data, schema)


def _split_credentials(url: str | None) -> tuple[str | None, tuple[str, str] | None]:
    """``url`` without ``user:password@``, and the (decoded) pair for HTTP Basic auth, if any."""
    if not url or "@" not in url.partition("?")[0]:
        return url, None
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    auth = (unquote(parts.username or ""), unquote(parts.password or ""))
    register(auth[1])
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), auth


def _again(error: LLMUnavailable) -> LLMUnavailable:
    """A fresh exception like ``error`` (one exception object must not be raised from two tasks)."""
    return LLMUnavailable(str(error), reason=error.reason, endpoint=error.endpoint)


def _cause(e: BaseException) -> str:
    """The innermost reason of a connection error (refused, reset, TLS ...), redacted and short."""
    for _ in range(8):                    # the chain of explicit causes (not what happened while handling)
        if e.__cause__ is None:
            break
        e = e.__cause__
    text = " ".join(str(e).split())[:160]
    return redact(f"{type(e).__name__}: {text}" if text else type(e).__name__)


def _message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(getattr(e, "message", "") or "")[:300]
