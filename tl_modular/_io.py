"""Artifact files: safetensors (tensors plus JSON metadata) and JSON, written atomically and read
with errors that name the file and the problem.

Files are written to a temporary name in the target folder and moved into place with
``os.replace``, so a crash never leaves a half-written artifact behind. Nothing is pickled.
Safetensors files carry a SHA-256 of their tensors, checked on reading, so a damaged file is
refused instead of loading wrong numbers.

Reading goes through the helpers here: :func:`read_json` (line and column of a syntax error),
:func:`read_versioned_json` (kind, format version — newer refused, older migrated or refused —
and required fields), :func:`read_safetensors` (truncated or damaged files, content hash, format
version, expected shapes) and :func:`reading`, the block inside which a loader interprets what it
read: a missing field, a wrong type or shape raised there becomes an :class:`ArtifactError`
naming the file. Every error says how to get a good file again (``writer``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from tl_modular.errors import ArtifactError, UnsupportedModelError

__all__ = ["SCHEMA_VERSION", "ArtifactError", "artifact_digest", "bind_files", "check_bound", "check_shapes",
           "read_json", "read_safetensors", "read_safetensors_header", "read_versioned_json", "reading", "write_json",
           "write_safetensors", "write_text"]

#: Version of the on-disk formats written by tl_modular.
SCHEMA_VERSION = 1

_umask: int | None = None
_umask_lock = threading.Lock()


def _file_mode() -> int:
    """0666 minus the process umask, read once (reading it means setting it: not from two threads)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0)
            os.umask(_umask)
    return 0o666 & ~_umask


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hint(writer: str | None) -> str:
    return f"; write it again with {writer}" if writer else ""


def _content_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def artifact_digest(obj: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> str:
    """SHA-256 of an artifact's content: ``obj`` as canonical JSON (sorted keys, so a JSON round trip
    gives the same digest) and ``tensors`` as stored (the content hash :func:`write_safetensors`
    records). What a derived artifact records of the one it was computed from (a graph of its
    compression, circuits of their graph), so that a load can refuse a pair from different saves."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    if tensors is not None:
        h.update(_content_hash(tensors).encode())
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, Any] | None = None) -> None:
    """Write ``tensors`` (made contiguous, on CPU) with JSON ``metadata`` to ``path`` atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"tl_modular": json.dumps({"schema_version": SCHEMA_VERSION, **(metadata or {}),
                                      "sha256": _content_hash(flat)})}
    _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=meta))


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu", *, writer: str | None = None,
                     shapes: Mapping[str, Sequence[int | None]] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata written by :func:`write_safetensors` (or any safetensors file).

    Raises :class:`ArtifactError` naming ``path`` for a truncated or damaged file, a content hash
    that does not match, a format version newer than this release, or a tensor missing from or
    of another shape than ``shapes`` (``None`` entries match any size).
    """
    path = Path(path)
    metadata = read_safetensors_header(path, writer=writer)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError derives from Exception only
        raise ArtifactError(f"{path} is not a readable safetensors file ({_short(e)}): it is damaged or was cut "
                            f"short" + _hint(writer), path=path) from None
    expected = metadata.pop("sha256", None)
    if expected is not None and _content_hash(tensors) != expected:
        raise ArtifactError(f"{path}: its tensors do not match the content hash written with them: the file is "
                            "damaged" + _hint(writer), path=path)
    if shapes is not None:
        check_shapes(tensors, shapes, path, writer)
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def read_safetensors_header(path: str | os.PathLike, *, writer: str | None = None) -> dict[str, Any]:
    """The tl_modular metadata of a safetensors file without loading its tensors (the header is
    checked against the file's size, so a truncated file is refused here)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such artifact: {path}" + _hint(writer))
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("tl_modular")
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError derives from Exception only
        raise ArtifactError(f"{path} is not a readable safetensors file ({_short(e)}): it is damaged or was cut "
                            f"short" + _hint(writer), path=path) from None
    metadata = _json_text(raw, path, writer, "its tl_modular metadata") if raw else {}
    if not isinstance(metadata, dict):
        raise ArtifactError(f"{path}: its tl_modular metadata is not a JSON object" + _hint(writer), path=path)
    _check_version(metadata.get("schema_version"), path, "safetensors", writer, None)
    return metadata


def check_shapes(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int | None]],
                 path: str | os.PathLike, writer: str | None = None) -> None:
    """Raise :class:`ArtifactError` naming ``path`` when a tensor of ``shapes`` is missing or of
    another shape (``None`` in a shape matches any size)."""
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ArtifactError(f"{path} lacks the tensor{'s' if len(missing) > 1 else ''} {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}: it is damaged or incomplete" + _hint(writer),
                            path=path)
    for name, want in shapes.items():
        got = tuple(tensors[name].shape)
        if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
            shown = tuple("*" if w is None else w for w in want)
            raise ArtifactError(f"{path}: tensor {name!r} has shape {got}, expected {shown}: the file is damaged or "
                                "belongs to another model" + _hint(writer), path=path)


# --- multi-file artifacts ------------------------------------------------------------------------
# Each file is written atomically, but a pair is not: a save interrupted between its files over an
# older artifact would leave the old index with the new tensors. So the member files are written
# first, each tagged ``bound_to`` the index, and the index last, recording each member's digest;
# loading checks them (check_bound), and a mix is an ArtifactError, never wrong numbers.

def _digest(path: Path, writer: str | None = None) -> str:
    """A member file's digest: a safetensors file's content hash (from its header, which
    read_safetensors checks against the tensors), else the SHA-256 of the file's bytes."""
    if path.suffix == ".safetensors":
        digest = read_safetensors_header(path, writer=writer).get("sha256")
        if digest:
            return str(digest)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bind_files(directory: str | os.PathLike, names: Sequence[str]) -> dict[str, str]:
    """``{name: digest}`` of the member files already written in ``directory``, to record in the
    index file written last (members written with ``write_safetensors(..., {"bound_to": index})``)."""
    return {name: _digest(Path(directory) / name) for name in names}


def check_bound(directory: str | os.PathLike, index: str, meta: Mapping[str, Any], members: Sequence[str],
                writer: str | None = None) -> None:
    """Refuse an index (``meta``, read from ``directory/index``) and member files from different saves.

    An index with a ``files`` record must match each member's digest; an index without one (written
    by an older release) must not sit beside a member that says it is ``bound_to`` an index.
    Call it after the members' own checks (damage, shapes), which name the problem more precisely.
    """
    directory = Path(directory)
    files = meta.get("files")
    for name in members:
        path = directory / name
        if not path.exists():
            continue  # the member's own reader says the file is missing
        if isinstance(files, Mapping) and name in files:
            if _digest(path, writer) == files[name]:
                continue
        elif path.suffix != ".safetensors" or not read_safetensors_header(path, writer=writer).get("bound_to"):
            continue
        raise ArtifactError(f"{path} and {directory / index} come from different saves: a save was interrupted "
                            f"between them (the older {index} or {name} was left); neither is used" + _hint(writer),
                            path=directory / index)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike, *, writer: str | None = None) -> Any:
    """The JSON document in ``path``; :class:`ArtifactError` with the line and column when it is not
    valid JSON (or not UTF-8), FileNotFoundError naming the file when there is none."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}" + _hint(writer)) from None
    except IsADirectoryError:
        raise ArtifactError(f"{path} is a folder, not a JSON file" + _hint(writer), path=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path} is not UTF-8 text (byte {e.start} of {len(data)}): it is damaged"
                            + _hint(writer), path=path) from None
    return _json_text(text, path, writer)


def _json_text(text: str, path: Path, writer: str | None, what: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        ending = ": the file ends early (cut short?)" if e.pos >= len(text.rstrip()) else ": it is damaged"
        raise ArtifactError(f"{path}{' (' + what + ')' if what else ''} is not valid JSON ({e.msg} at {where})"
                            f"{ending}" + _hint(writer), path=path) from None


def _check_version(version: Any, path: Path, schema: str, writer: str | None,
                   migrations: Mapping[int, Callable[[dict], dict]] | None) -> bool:
    """True when ``version`` is older and must be migrated; raises for newer, unknown or unmigratable."""
    if version is None:
        return False                     # files written before versions were recorded: read as current
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{path}: its {schema} format version is {version!r}, not an integer: it is damaged"
                            + _hint(writer), path=path)
    if version > SCHEMA_VERSION:
        from tl_modular import __version__

        raise ArtifactError(f"{path} was written in {schema} format version {version}, newer than version "
                            f"{SCHEMA_VERSION}, the newest this tl_modular ({__version__}) reads: upgrade tl_modular "
                            "to read it", path=path)
    if version < SCHEMA_VERSION:
        if not migrations or any(v not in migrations for v in range(version, SCHEMA_VERSION)):
            raise ArtifactError(f"{path} was written in {schema} format version {version}, older than version "
                                f"{SCHEMA_VERSION}, and this tl_modular cannot migrate it" + _hint(writer), path=path)
        return True
    return False


def read_versioned_json(directory: str | os.PathLike, name: str | None, schema: str, writer: str, *,
                        required: Sequence[str] = (), migrations: Mapping[int, Callable[[dict], dict]] | None = None,
                        schema_key: str = "schema", version_key: str = "version") -> dict[str, Any]:
    """``directory/name`` (or the file ``directory`` when ``name`` is None), a JSON object written
    with ``{schema_key: schema, version_key: SCHEMA_VERSION, ...}``, checked: its kind, its format
    version (newer: refused naming both versions; older: migrated through ``migrations[v]``,
    ``v → v + 1``, or refused saying so), and the ``required`` fields. Every problem raises
    :class:`ArtifactError` (FileNotFoundError for no file) naming the file; ``writer`` names
    what writes a good one."""
    path = Path(directory) if name is None else Path(directory) / name
    if not path.exists():
        where = f"no {path.name} in {path.parent}" if name is not None else f"no such file: {path}"
        raise FileNotFoundError(f"{where}; write one with {writer}")
    meta = read_json(path, writer=writer)
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} holds a JSON {type(meta).__name__}, not a {schema} object" + _hint(writer),
                            path=path)
    if meta.get(schema_key) != schema:
        raise ArtifactError(f"{path} is not a {schema} file (its {schema_key} is {meta.get(schema_key)!r})"
                            + _hint(writer), path=path)
    version = meta.get(version_key)
    if version is None:
        raise ArtifactError(f"{path} has no {version_key!r} field: it is damaged" + _hint(writer), path=path)
    if _check_version(version, path, schema, writer, migrations):
        for v in range(version, SCHEMA_VERSION):         # _check_version made sure every step exists
            with reading(path, writer):
                meta = (migrations or {})[v](meta)
        meta[version_key] = SCHEMA_VERSION
    missing = [k for k in required if k not in meta]
    if missing:
        raise ArtifactError(f"{path} lacks the field{'s' if len(missing) > 1 else ''} {missing}: it is damaged or "
                            "incomplete" + _hint(writer), path=path)
    return meta


@contextlib.contextmanager
def reading(path: str | os.PathLike, writer: str | None = None) -> Iterator[None]:
    """Interpret an artifact's contents inside this block: a missing field (KeyError), a value of
    the wrong type or shape (TypeError, ValueError, IndexError, AttributeError, RuntimeError from
    a shape mismatch) becomes an :class:`ArtifactError` naming ``path``. Errors that already say
    which file or model is at fault (ArtifactError, UnsupportedModelError) pass through."""
    try:
        yield
    except (ArtifactError, UnsupportedModelError, FileNotFoundError):
        raise
    except KeyError as e:
        raise ArtifactError(f"{path} lacks the field {e.args[0]!r}: it is damaged or incomplete" + _hint(writer),
                            path=path) from None
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise ArtifactError(f"{path} is malformed ({type(e).__name__}: {_short(e)})" + _hint(writer),
                            path=path) from None


def _short(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[: n - 3] + "..."
