"""One place that keeps secrets out of everything tl_modular shows, logs or saves.

:func:`redact` removes, from any text: credentials inside URLs (``https://user:KEY@host``), keys in
query strings (``?api_key=...``), ``Authorization`` headers and ``Bearer``/``Basic`` tokens,
``api_key=``/``"api_key": ...`` fields, and every occurrence of a known secret — the keys given to a
:class:`~tl_modular.labeling.ClientConfig` or read by the CLI (:func:`register`), and the values of
environment variables whose names say they hold one (``OPENAI_API_KEY``, ``*_TOKEN``, ...).
:func:`redact_url` is the form for URLs, :func:`redact_obj` walks JSON-like data (fields named
``api_key``, ``authorization``, ``password`` ... become ``***``).

>>> redact_url("https://me:sk-abc123456789@proxy.example/v1?api_key=sk-abc123456789")
'https://***@proxy.example/v1?api_key=***'
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

__all__ = ["MASK", "mask_secrets", "redact", "redact_obj", "redact_url", "register"]

MASK = "***"

# A secret shorter than this is not replaced as a plain string: "none", "EMPTY" and the like are
# placeholders for servers that take no key, and replacing them would mangle ordinary words.
_MIN_SECRET = 8
_PLACEHOLDERS = {"none", "empty", "null", "dummy", "sk-no-key-required", "not-needed"}
_SECRET_ENV = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH)", re.IGNORECASE)
_SECRET_FIELDS = {"api_key", "apikey", "api-key", "authorization", "proxy-authorization", "password", "passwd",
                  "secret", "client_secret", "access_token", "auth_token", "refresh_token", "x-api-key"}

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/?#\s@]+(?:@[^/?#\s@]+)*)@")
_QUERY_SECRET = re.compile(r"(?P<name>[?&;](?:api[_-]?key|key|token|access_token|auth|password|secret|sig|"
                           r"signature)=)[^&#;\s\"']+", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<name>\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token)\s+)?"
                          r"[^\s\"',;}]+", re.IGNORECASE)
# "Bearer" alone, capitalised as in headers: "basic"/"bearer" are ordinary words in label texts
_BEARER = re.compile(r"(?P<name>\bBearer\s+)[A-Za-z0-9._~+/=\-]{8,}")
_FIELD = re.compile(r"(?P<name>\b(?:api[_-]?key|password|passwd|client_secret|x-api-key)[\"']?\s*[:=]\s*)"
                    r"(?:(?P<q>[\"'])(?:(?!(?P=q)).)*(?P=q)|[^\s,;&)}\]]+)", re.IGNORECASE)

_registered: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """Remember ``secret`` so that :func:`redact` replaces it wherever it appears (a no-op for
    ``None``, placeholders such as ``"none"`` and strings too short to be a key)."""
    if _is_secret(secret):
        with _lock:
            _registered.add(secret)  # type: ignore[arg-type]


def _is_secret(value: Any) -> bool:
    return isinstance(value, str) and len(value) >= _MIN_SECRET and value.strip().lower() not in _PLACEHOLDERS


def _secrets(extra: tuple[str | None, ...] = ()) -> list[str]:
    """Every known secret, longest first (so that a key containing another is replaced whole)."""
    found = {s for s in extra if _is_secret(s)}
    with _lock:
        found |= _registered
    found |= {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and _is_secret(v)}
    return sorted(found, key=len, reverse=True)


def redact(text: Any, *secrets: str | None) -> str:
    """``text`` (made a string) with every secret replaced by ``***`` (see the module docs);
    ``secrets`` adds values to replace besides the registered and environment ones.

    >>> redact("POST https://u:p4ssw0rd-xyz@h/v1 Authorization: Bearer sk-1234567890")
    'POST https://***@h/v1 Authorization: ***'
    """
    return _redact(str(text), _secrets(secrets))


def _redact(text: str, keys: list[str]) -> str:
    for s in keys:
        if s in text:
            text = text.replace(s, MASK)
        quoted = _percent(s)                     # the same key as it appears inside a URL
        if quoted != s and quoted in text:
            text = text.replace(quoted, MASK)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['name']}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m['name']}{MASK}", text)
    return _FIELD.sub(lambda m: f"{m['name']}{m['q'] or ''}{MASK}{m['q'] or ''}", text)


def mask_secrets(text: str, *secrets: str | None) -> str:
    """``text`` with only the known secret values replaced (no pattern rewriting): fast, and it keeps
    serialized JSON valid — for data written verbatim, such as cached LLM answers."""
    for s in _secrets(secrets):
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_url(url: str | None, *secrets: str | None) -> str | None:
    """A URL fit to show: no ``user:password@``, no key in its query string (None stays None)."""
    return None if url is None else redact(url, *secrets)


def redact_obj(obj: Any, *secrets: str | None) -> Any:
    """A copy of JSON-like ``obj`` (dicts, lists, tuples, strings, numbers) with secret fields set
    to ``***`` and every string passed through :func:`redact`."""
    keys = _secrets(secrets)                     # computed once for the whole walk

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return _redact_with(x, keys)
        if isinstance(x, dict):
            return {k: (MASK if isinstance(k, str) and k.lower() in _SECRET_FIELDS and v not in (None, "")
                        else walk(v)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x
    return walk(obj)


# what a string must contain for a pattern to apply (checked lower-cased): most strings of a labels
# file (tokens, labels) contain none and skip the regular expressions
_HINTS = ("://", "uthoriz", "bearer", "api", "key=", "token=", "auth=", "passw", "secret=", "sig=", "signature=")


def _redact_with(text: str, keys: list[str]) -> str:
    if any(k in text for k in keys):
        return _redact(text, keys)
    low = text.lower()
    return _redact(text, keys) if any(h in low for h in _HINTS) else text


def _percent(secret: str) -> str:
    from urllib.parse import quote

    return quote(secret, safe="")
