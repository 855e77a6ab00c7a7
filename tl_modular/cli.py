"""``tl-modular``: the whole flow in one command.

    tl-modular analyze                                  # the bundled modular model, offline, no API key
    tl-modular analyze --model toy                      # the bundled model before modularity training
    tl-modular analyze --model gpt2 --data corpus.txt   # any TransformerLens model name
    tl-modular analyze --labeler openai --llm-model gpt-4o-mini [--base-url http://localhost:8000/v1]
    tl-modular diff reportA reportB                     # what changed between two report directories

    torchrun --nproc-per-node 2 -m tl_modular analyze ...   # data parallel: one process per CPU group / GPU
    tl-modular analyze --nproc 2 ...                    # the same, torchrun started for you

Exit status: 0 on success; 2 on bad arguments or inputs (one message says what to do; the traceback
only with --debug); 1 on an internal error; 130 when interrupted (Ctrl-C) — the stages finished so
far stay in the report directory and the same command reuses them. In a data-parallel run, a rank
stops with 3 when another rank failed; ``--nproc N`` then names the rank that failed first and
exits with its status (128 + the signal for a rank killed by a signal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tl_modular.report import Inputs

_TASKS = ("ioi", "greater_than", "docstring", "induction")
_BUNDLED = ("toy-modular", "toy")   # tl_modular.report.BUNDLED_MODELS, named here to keep --help fast
_DEFAULTS = {"tokens": 4096, "seq_len": 128, "llm_model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY",
             "llm_concurrency": 16}
_LLM_OPTIONS = ("llm_model", "base_url", "api_key_env", "llm_budget", "llm_concurrency", "llm_batch")


class UsageError(Exception):
    """A problem with the command's arguments or inputs; printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tl-modular", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (secrets masked)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an error (secrets masked)")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", parents=[debug],
                       help="segment, compress, graph, modules, circuits, SAEs, labels → report directory")
    # options whose defaults are None are filled in after parsing, so that one given where it does not
    # apply (e.g. --sae with the bundled model) is an error instead of being ignored
    a.add_argument("--model", default=None,
                   help="a TransformerLens model name, or a bundled model: toy-modular (the default: trained with "
                        "the modularity loss, four modules), toy (the same model before, one module) or textlm "
                        "(a GPT-2 trained on real text)")
    a.add_argument("--data", default=None,
                   help="a text file, a token file (.npy or .safetensors with 'tokens' [batch, pos]), or a Hugging "
                        "Face dataset name (its 'text' column); required with --model")
    a.add_argument("--tokens", type=int, default=None, help="tokens of --data to analyze (default 4096)")
    a.add_argument("--seq-len", type=int, default=None, help="sequence length for text data (default 128)")
    a.add_argument("--circuits", default=None,
                   help=f"comma-separated GPT-2 prompt sets for circuits with --model ({', '.join(_TASKS)}); "
                        "the bundled model always uses its four tasks")
    a.add_argument("--sae", action="append", default=[], metavar="RELEASE:ID_OR_PATH",
                   help="an sae-lens SAE for the polysemanticity table with --model (repeatable): release:sae_id "
                        "or a folder; the bundled model uses its own SAEs")
    a.add_argument("--labeler", choices=("offline", "openai"), default="offline")
    a.add_argument("--llm-model", default=None, help="the labeling model (with --labeler openai; default gpt-4o-mini)")
    a.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    a.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    a.add_argument("--llm-budget", type=float, default=None, metavar="USD",
                   help="stop labeling cleanly once this much is spent (from the server's token usage)")
    a.add_argument("--llm-concurrency", type=int, default=None, help="LLM requests in flight at once (default 16)")
    a.add_argument("--llm-batch", action="store_true", default=None,
                   help="label through the OpenAI Batch API (half the price, answered within 24 h; a re-run of the "
                        "same command resumes the batches in flight)")
    a.add_argument("--metric", choices=("loss", "logit"), default=None,
                   help="route strengths from the loss or the correct logit (default: logit for the bundled "
                        "model, loss otherwise)")
    a.add_argument("--out", default="tl_modular_report", help="report directory (default ./tl_modular_report)")
    a.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:1, mps ... (an error when not available); under torchrun 'cuda' is "
                        "each rank's own GPU, cuda:LOCAL_RANK")
    a.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run N data-parallel processes (torchrun on this machine: gloo on CPUs, NCCL with "
                        "--device cuda); the report equals one process's")
    a.add_argument("--no-reuse", action="store_true", help="recompute every stage even if the directory has it")
    a.add_argument("--attribution", action=argparse.BooleanOptionalAction, default=True,
                   help="feature circuits per category: pruned attribution graphs over the compression, each "
                        "within a memory budget (on by default; --no-attribution skips the stage, reusing the "
                        "others)")
    a.add_argument("--quiet", action="store_true")
    d = sub.add_parser("diff", parents=[debug], help="what changed between two report directories")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--out", default=None, help="also write the diff here: diff.json and report.html (the viewer)")
    d.add_argument("--top", type=int, default=15)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``tl-modular``; returns the exit status (see the module docs)."""
    from tl_modular._redact import redact

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    where = _rank_prefix()

    def fail(message: str, status: int) -> int:
        if debug:
            import traceback

            print(redact(traceback.format_exc()), file=sys.stderr, end="")
        print(redact(f"tl-modular: {where}{message}"), file=sys.stderr)
        return status

    if args.command == "analyze" and args.nproc is not None:
        if args.nproc < 1:
            return fail(f"error: --nproc must be >= 1, got {args.nproc}", 2)
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch(argv, args.nproc)

    try:
        with warnings.catch_warnings():
            # a warning is one line on stderr, like the errors (and as free of secrets)
            warnings.showwarning = lambda message, category, *_, **__: print(
                redact(f"tl-modular: warning: {message}"), file=sys.stderr)
            if args.command == "analyze":
                return _analyze(args)
            return _diff(args)
    except UsageError as e:
        return fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        return fail(f"interrupted{_saved_stages(args)}", 130)
    except Exception as e:  # noqa: BLE001 - the user gets one message; --debug shows the traceback
        from tl_modular.errors import ArtifactError, LabelingError

        if isinstance(e, (ArtifactError, LabelingError)):       # a bad file, key, server: the user can fix it
            return fail(f"error: {e}{_saved_stages(args)}", 2)
        return fail(f"internal error: {type(e).__name__}: {e}\n(run again with --debug for the traceback; "
                    "please report it)", 1)


def _saved_stages(args: argparse.Namespace) -> str:
    """Which stages of ``analyze`` are saved in the report directory (for the interrupt message)."""
    if args.command != "analyze":
        return ""
    import json

    from tl_modular.report.pipeline import staging_dir

    # an unfinished report is built beside --out (which keeps the previous report whole)
    where = staging_dir(args.out) if staging_dir(args.out).is_dir() else Path(args.out)
    try:
        stages = list(json.loads((where / "manifest.json").read_text()).get("stages", {}))
    except (OSError, ValueError, AttributeError):
        stages = []
    if not stages:
        return f"; no stage was finished in {where}"
    return (f"; the stages finished so far ({', '.join(stages)}) are saved in {where}: run the same command "
            f"again to reuse them{'' if where == Path(args.out) else f' ({args.out} is left as it was)'}")


# --- data parallel ------------------------------------------------------------------------------

def _rank_prefix() -> str:
    """``"rank 1 of 2: "`` in a process started by torchrun, else nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"rank {os.environ.get('RANK', '?')} of {size}: " if size > 1 else ""


_PEER_FAILED = 3     # the exit status of a rank that stops because another rank failed


def _launch(argv: list[str], nproc: int) -> int:
    """``analyze --nproc N``: the same command under torchrun's launcher (run in this process), N
    processes on this machine. A rank that fails stops the others; the message names it and its
    exit status, and the report directory is left as it was (a fresh --out left empty is removed)."""
    import signal

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from tl_modular.report.pipeline import staging_dir

    args = _parser().parse_args(argv)
    out = Path(args.out)
    fresh = not out.exists()
    launch = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tl_modular",
                                  *_without_nproc(argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        with _quiet_launcher(getattr(args, "debug", False)):
            torchrun.run(launch)
        return 0
    except ChildFailedError as e:
        message, status = _failed_ranks(e, nproc)
    except (SignalException, KeyboardInterrupt) as e:     # Ctrl-C: the launcher passes it on to the ranks
        sig = getattr(e, "sigval", signal.SIGINT)
        message = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
        status = 128 + int(sig)
    except Exception as e:  # noqa: BLE001 - e.g. no free port for the rendezvous: one message, no traceback
        message, status = f"torchrun's launcher failed ({type(e).__name__}: {e})", 1
    finally:
        for s, h in handlers.items():         # the launcher's handlers raise its own exception: put ours back
            signal.signal(s, h)
    _remove_if_empty(staging_dir(out))        # no stage finished: nothing to resume
    removed = fresh and _remove_if_empty(out)  # made by rank 0 for a report that was never written
    if staging_dir(out).is_dir():
        message += _saved_stages(args)
    else:
        message += f"; no stage was finished{f' ({args.out} was not created)' if removed else ''}"
    print(f"tl-modular: {message}", file=sys.stderr)
    return status


def _remove_if_empty(folder: Path) -> bool:
    """Remove ``folder`` if it is an empty folder; whether it was."""
    try:
        folder.rmdir()                        # fails on a folder with anything in it
    except OSError:
        return False
    return True


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (the ranks run the command as one of N)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return rest


@contextlib.contextmanager
def _quiet_launcher(debug: bool) -> Any:
    """Silence torchrun's own log lines (its failure report is a page per rank) unless ``debug``:
    the ranks' messages and ours say what happened."""
    import logging

    names = [n for n in logging.Logger.manager.loggerDict
             if n.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"))]
    levels = {n: logging.getLogger(n).level for n in names}
    if not debug:
        for n in names:
            logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _failed_ranks(error: Any, nproc: int) -> tuple[str, int]:
    """(message, exit status) for torchrun's ``ChildFailedError``: the ranks that failed of their own
    accord — not those that stopped because of them (status 3) or that the launcher stopped
    (SIGTERM) — else the first failure torchrun saw."""
    import signal

    failures = dict(error.failures)
    first = {r: f for r, f in failures.items() if f.exitcode not in (_PEER_FAILED, -int(signal.SIGTERM))}
    if not first:
        rank, failure = error.get_first_failure()
        first = {rank: failure}

    def how(f: Any) -> str:
        if f.exitcode < 0:
            return f"was killed by {f.signal_name()} (exit status {f.exitcode})"
        return f"exited with status {f.exitcode}"

    ranks = sorted(first)
    said = "; ".join(f"rank {r} {how(first[r])}" for r in ranks)
    others = "" if len(first) == nproc else "; the other ranks stopped with it"
    code = first[ranks[0]].exitcode
    status = code if code > 0 else 128 - code
    see = "its message" if len(first) == 1 else "their messages"
    return f"the {nproc}-process run failed: {said} (see {see} above){others}", status


def _init_distributed(device: str) -> tuple[str, bool]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the rank's device (a
    plain ``cuda`` becomes ``cuda:LOCAL_RANK``) and whether this call initialised the group."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return device, False
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if torch.distributed.is_initialized():
        return device, False
    backend = "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
        backend = "nccl"
    torch.distributed.init_process_group(backend)
    return device, True


# --- analyze ------------------------------------------------------------------------------------

def _analyze(args: argparse.Namespace) -> int:
    _check_options(args)
    if args.data is not None:
        _check_data(args.data)          # before any model is loaded
    if args.model not in (None, "textlm", *_BUNDLED):
        _check_hub(args.model)          # before the slow imports: fail in seconds, not after retries
    labeler, simulator = _labeler(args)
    device, initialised = _init_distributed(_check_device(args.device))
    try:
        return _analyze_here(args, device, labeler, simulator)
    except Exception as e:
        from tl_modular._dist import RankFailedError

        if not isinstance(e, RankFailedError):
            raise
        # not this rank's fault: the launcher names the rank that failed
        print(f"tl-modular: {_rank_prefix()}stopped: {e}; the launcher names that rank", file=sys.stderr)
        return _PEER_FAILED
    finally:
        if initialised:
            import torch

            torch.distributed.destroy_process_group()


def _analyze_here(args: argparse.Namespace, device: str, labeler: Any, simulator: Any) -> int:
    from tl_modular import _dist

    main = _dist.is_main()
    created = _check_out(args.out) if main else False     # only rank 0 touches the report directory
    try:
        import torch

        from tl_modular import report

        inputs, metric = _inputs(args, device, labeler, simulator)
    except BaseException:
        if created:                     # nothing was written yet: leave no empty report directory behind
            with contextlib.suppress(OSError):
                Path(args.out).rmdir()
        raise
    torch.manual_seed(0)
    path = report.analyze(inputs, args.out, report.AnalyzeConfig(metric=metric, attribution=args.attribution),
                          reuse=not args.no_reuse,
                          progress=not args.quiet and main)
    if main:
        print(f"report: {path}")
    return 0


def _inputs(args: argparse.Namespace, device: str, labeler: Any, simulator: Any) -> tuple[Inputs, str]:
    """``(inputs, metric)`` of the model asked for: a bundled toy model (metric: the task logits), the
    bundled text model or a TransformerLens model by name with its ``--data`` (metric: the loss)."""
    from tl_modular import report

    if args.model is None or args.model in _BUNDLED:
        inputs = report.bundled_inputs(labeler=labeler, simulator=simulator, device=device,
                                       variant="plain" if args.model == "toy" else "modular")
        return inputs, args.metric or "logit"
    if args.model == "textlm":
        return _textlm_inputs(args, device, labeler, simulator), args.metric or "loss"
    model = _load_model(args.model, device)
    tokens, data = _load_data(args.data, model, args.tokens, args.seq_len)
    inputs = report.Inputs(model=model, tokens=tokens, name=args.model, categories=_categories(args, model),
                           saes=_saes(args, model), labeler=labeler, simulator=simulator,
                           decode=getattr(model, "to_string", None), data=data)
    return inputs, args.metric or "loss"


def _textlm_inputs(args: argparse.Namespace, device: str, labeler: Any, simulator: Any) -> Inputs:
    """The bundled real-text GPT-2 on its own text, or on ``--data`` when given."""
    from tl_modular import report, textlm

    model = textlm.load_model(device=device)
    tokens, data = (None, None) if args.data is None else _load_data(args.data, model, args.tokens, args.seq_len)
    inputs = report.textlm_inputs(n_tokens=args.tokens, seq_len=args.seq_len, labeler=labeler,
                                  simulator=simulator, model=model, tokens=tokens, data=data)
    if args.circuits:
        inputs.categories = _categories(args, model)
    if args.sae:
        inputs.saes = _saes(args, model)
    return inputs


def _check_options(args: argparse.Namespace) -> None:
    """Options given where they do not apply are errors (never silently ignored); then the defaults."""
    given = lambda name: getattr(args, name) not in (None, [])  # noqa: E731
    if args.model is None or args.model in _BUNDLED:
        if args.data is not None:
            raise UsageError("--data needs --model with a TransformerLens model name (the bundled models analyze "
                             "their own task data)")
        for name, why in (("sae", "it uses its own SAEs"), ("circuits", "it always uses its four tasks"),
                          ("tokens", "it analyzes its own task data"), ("seq_len", "it analyzes its own task data")):
            if given(name):
                raise UsageError(f"--{name.replace('_', '-')} does not apply to the bundled model ({why}): drop it, "
                                 "or analyze a model of your own with --model NAME --data FILE")
    elif args.model != "textlm" and args.data is None:
        raise UsageError("--model needs --data: a text file, a token file or a Hugging Face dataset name")
    if args.labeler != "openai":
        for name in _LLM_OPTIONS:
            if given(name):
                raise UsageError(f"--{name.replace('_', '-')} applies only with --labeler openai: add "
                                 "--labeler openai, or drop it")
    for name, value in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.tokens < 2 or args.seq_len < 2:
        raise UsageError("--tokens and --seq-len must be at least 2")
    if args.llm_concurrency < 1:
        raise UsageError("--llm-concurrency must be at least 1")
    if args.llm_budget is not None and not args.llm_budget >= 0:
        raise UsageError(f"--llm-budget must be a number of USD >= 0, got {args.llm_budget}")


def _is_path(spec: str) -> bool:
    return Path(spec).suffix in (".txt", ".md", ".npy", ".safetensors") or os.sep in spec or Path(spec).exists()


def _check_data(spec: str) -> None:
    """A --data file that exists and can be read, or a dataset name with `datasets` installed."""
    path = Path(spec)
    if _is_path(spec):
        if not path.exists():
            raise UsageError(f"--data {spec}: no such file; give a text file (.txt/.md), a token file (.npy, "
                             ".safetensors) or a Hugging Face dataset name")
        if not path.is_file():
            raise UsageError(f"--data {spec} is a directory; give a text or token file")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise UsageError(f"--data {spec} cannot be read ({e.strerror or e})") from None
        return
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise UsageError(f"--data {spec!r} is not a file; to read a Hugging Face dataset install `datasets`")


def _check_out(out: str) -> bool:
    """--out is (or can be made) a directory this process can write; True when it was made here."""
    import tempfile

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory: choose another --out (or move the file away)")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        what = "cannot be created" if not path.is_dir() else "is not writable"
        raise UsageError(f"--out {out} {what} ({e.strerror or e}): choose a directory you can write") from None
    return created


def _available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def _check_device(spec: str) -> str:
    """``spec`` when this machine has that device; else an error naming the devices it has."""
    import torch

    available = _available_devices()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device name; available here: {', '.join(available)}") from None
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        ok = torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    else:
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        ok = bool(getattr(backend, "is_available", lambda: False)())
    if not ok:
        raise UsageError(f"--device {spec} is not available on this machine (available: {', '.join(available)}): "
                         "choose one of those")
    return spec


def _labeler(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.labeler == "offline":
        return None, None
    from tl_modular._redact import register

    key = os.environ.get(args.api_key_env)
    register(key)
    if not key and args.base_url is None:
        raise UsageError(f"--labeler openai needs an API key in ${args.api_key_env} (or --base-url for a local "
                         "server that takes none)")
    try:
        from tl_modular.labeling import OpenAILabeler
    except ImportError as e:
        raise UsageError(f"the OpenAI labeler is not available in this installation ({e})") from None
    from tl_modular.labeling import ClientConfig

    # replies are cached by content under the report directory: a re-run costs nothing
    config = ClientConfig(model=args.llm_model, base_url=args.base_url, api_key=key or "none",
                          max_concurrency=args.llm_concurrency, budget_usd=args.llm_budget,
                          cache_dir=os.path.join(args.out, "llm_cache"), batch=bool(args.llm_batch))
    labeler = OpenAILabeler(config=config)
    return labeler, labeler


def _hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (None when a TCP connection opens): checked up front, since
    the hub client retries with backoff for half a minute before giving up."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def _check_hub(name: str) -> None:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE") != "1" and (why := _hub_unreachable(endpoint)):
        raise UsageError(
            f"cannot reach the Hugging Face hub at {endpoint} to load {name!r} ({why}).\nTo run offline: with the "
            "model already in your Hugging Face cache, set HF_HUB_OFFLINE=1; or run `tl-modular analyze` without "
            "--model for the bundled model, which needs no download.")


def _load_model(name: str, device: str) -> Any:
    from transformer_lens import HookedTransformer

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        return HookedTransformer.from_pretrained(name, device=device).eval()
    except Exception as e:  # noqa: BLE001 — every hub failure gets the same advice
        text = f"{type(e).__name__}: {e}"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        if "not found" in text.lower() and "official" in text.lower():
            raise UsageError(f"{name!r} is not a TransformerLens model name ({text.splitlines()[0][:200]})") from None
        raise UsageError(
            f"could not load {name!r} from the Hugging Face hub at {endpoint}"
            + (" (HF_HUB_OFFLINE=1: it must already be in your Hugging Face cache)" if offline else "")
            + f": {text.splitlines()[0][:300]}\nTo run offline: download the model once where the hub is reachable "
            "(it stays in ~/.cache/huggingface), then set HF_HUB_OFFLINE=1; or run `tl-modular analyze` without "
            "--model for the bundled model, which needs no download.") from None


def _load_data(spec: str, model: Any, n_tokens: int, seq_len: int) -> tuple[Any, dict[str, Any]]:
    """The token rows to analyze and a record of what was read, used and dropped (for the manifest)."""
    import numpy as np
    import torch

    path = Path(spec)
    if _is_path(spec):
        _check_data(spec)
        if path.suffix == ".npy":
            try:
                tokens = torch.as_tensor(np.load(path, allow_pickle=False))
            except (ValueError, OSError, EOFError) as e:
                raise UsageError(f"--data {spec} is not a readable .npy array of token ids ({e}); write it with "
                                 "numpy.save (no pickled objects)") from None
        elif path.suffix == ".safetensors":
            from tl_modular._io import read_safetensors

            tensors, _ = read_safetensors(path)
            if "tokens" not in tensors:
                raise UsageError(f"{spec} has no 'tokens' tensor (it has {sorted(tensors)})")
            tokens = tensors["tokens"]
        else:
            return _text_rows(spec, model, path.read_text(encoding="utf-8", errors="replace"), n_tokens, seq_len)
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.numel() == 0:
            raise UsageError(f"token file {spec} must hold an integer [batch, pos] array, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}")
        if tokens.shape[1] > model.cfg.n_ctx:
            raise UsageError(f"token file {spec} has rows of {tokens.shape[1]} tokens, more than the model's "
                             f"n_ctx={model.cfg.n_ctx}: cut them into rows of at most {model.cfg.n_ctx}")
        if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
            raise UsageError(f"token ids in {spec} fall outside the model's vocabulary (0..{model.cfg.d_vocab - 1})")
        rows = max(1, n_tokens // tokens.shape[1])
        used = tokens[:rows].long()
        info = {"source": spec, "kind": "tokens", "read": int(tokens.numel()), "used": int(used.numel()),
                "dropped": int(tokens.numel() - used.numel()), "rows": int(used.shape[0]),
                "seq_len": int(tokens.shape[1])}
        _say_data(info, n_tokens)
        return used, info
    return _text_rows(spec, model, _dataset_text(spec, n_tokens), n_tokens, seq_len, kind="dataset")


def _dataset_text(name: str, n_tokens: int) -> str:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{name!r} is not a file; to read a Hugging Face dataset install `datasets`") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        texts, size = [], 0
        for row in ds:
            text = row.get("text")
            if text is None:
                raise UsageError(f"dataset {name!r} has no 'text' column (columns: {sorted(row)})")
            texts.append(text)
            size += len(text) // 3
            if size > 2 * n_tokens:
                break
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"could not read the Hugging Face dataset {name!r}: {type(e).__name__}: {e}. Offline, pass "
                         "a text or token file with --data instead") from None
    return "\n\n".join(texts)


def _text_rows(spec: str, model: Any, text: str, n_tokens: int, seq_len: int,
               kind: str = "text") -> tuple[Any, dict[str, Any]]:
    from tl_modular._tokens import tokens_from_text

    if getattr(model, "tokenizer", None) is None:
        raise UsageError("this model has no tokenizer: pass token ids (.npy / .safetensors) with --data")
    try:
        tokens, counts = tokens_from_text(model, text, n_tokens, seq_len, return_counts=True)
    except ValueError as e:
        raise UsageError(f"--data {spec}: {e}".replace("seq_len", "--seq-len")) from None
    info = {"source": spec, "kind": kind, **{k: getattr(counts, k) for k in ("read", "used", "dropped", "rows",
                                                                             "seq_len", "bos")}}
    _say_data(info, n_tokens)
    return tokens, info


def _say_data(info: dict[str, Any], n_tokens: int) -> None:
    print(f"data: {info['source']}: read {info['read']:,} tokens, used {info['used']:,} in {info['rows']:,} rows of "
          f"{info['seq_len']}, dropped {info['dropped']:,} (--tokens {n_tokens:,})", file=sys.stderr)


def _categories(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    if not args.circuits:
        return {}
    from tl_modular import tasks

    out = {}
    for name in args.circuits.split(","):
        name = name.strip()
        if name not in _TASKS:
            raise UsageError(f"unknown prompt set {name!r}; choose from {', '.join(_TASKS)}")
        out[name] = getattr(tasks, name)(model.tokenizer, 32, seed=0)
    return out


def _saes(args: argparse.Namespace, model: Any) -> Any:
    if not args.sae:
        return None
    from tl_modular import sae

    loaded = []
    for spec in args.sae:
        try:
            if Path(spec).exists():
                loaded.append(sae.load(spec, model=model))
            else:
                release, _, sae_id = spec.partition(":")
                if not sae_id:
                    raise UsageError(f"--sae {spec!r}: give release:sae_id or an SAE folder")
                loaded.append(sae.load(release, sae_id, model=model))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--sae {spec!r}: {type(e).__name__}: {e}") from None
    return sae.SAESet(loaded, model)


# --- diff ---------------------------------------------------------------------------------------

def _diff(args: argparse.Namespace) -> int:
    for d in (args.a, args.b):
        if not Path(d).is_dir():
            raise UsageError(f"{d} is not a report directory (no such directory): give two directories written by "
                             "`tl-modular analyze --out DIR`")
        if not (Path(d) / "graph.json").exists():
            raise UsageError(f"{d} is not a report directory (no graph.json): run `tl-modular analyze --out {d}`")
    if args.out is not None:
        _check_out(args.out)
    try:
        from tl_modular.diffing import diff
    except ImportError:
        raise UsageError("model diffing is not available in this version") from None
    from tl_modular.compression import Compression
    from tl_modular.graph import ChannelGraph

    def side(d: str) -> Any:
        comp = Compression.load(Path(d) / "compression") if (Path(d) / "compression").exists() else None
        return ChannelGraph.load(d, compression=comp)
    result = diff(side(args.a), side(args.b))
    print(result.summary(args.top) if hasattr(result, "summary") else result)
    if args.out:
        result.save(args.out)
        from tl_modular.report.html import render_diff

        print(f"report: {render_diff(args.out, args.a, args.b)}")   # the diff in the report's viewer
    return 0


if __name__ == "__main__":
    sys.exit(main())
