"""Train the bundled real-text GPT-2 (``tl_modular/textlm/checkpoint``) from scratch.

    python tools/train_textlm.py corpus                  # fetch Debian packages, extract, tokenize
    python tools/train_textlm.py train --device cuda --minutes 6      # or --steps N; resumable
    python tools/train_textlm.py export                  # -> tl_modular/textlm/checkpoint/

The text is what any Debian machine can fetch with ``apt-get download`` (no model hub, no web):
English prose of the Python 3.11 and Sphinx documentation (their reStructuredText sources) and
the source code, docstrings included, of the Python standard library and of widely used packages
(Django, NumPy, SciPy, pandas, Matplotlib, Pygments, docutils, Sphinx, setuptools). The held-out
text comes from a different project: NetworkX's source. ``corpus.json`` records every package's
version and the SHA-256 of every ``.deb`` and token file, so a later corpus can be compared.

The model is GPT-2 exactly (Hugging Face ``GPT2LMHeadModel``: pre-LayerNorm, gelu_new, learned
positions, tied embeddings) with the real GPT-2 tokenizer, small: 4 layers, d_model 192, 6 heads,
n_ctx 512. Every training row starts with ``<|endoftext|>``, the BOS TransformerLens prepends,
so position 0 behaves as it does in GPT-2 under TransformerLens (an attention sink).

Training keeps fp32 master weights (bf16 autocast on CUDA), AdamW, linear warm-up then cosine
decay; ``--minutes`` times the first steps and fixes the schedule's length to fit. Checkpoints
(weights and optimizer moments, safetensors + JSON) are written every ``--save-every`` steps and a
re-run resumes from them, so training may span sessions. Batches depend only on (seed, step).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tl_modular" / "textlm" / "checkpoint"
EOT = 50256

#: (package, what to take). "rst": Sphinx sources (``_sources/**/*.txt``); "py": Python source
#: outside test folders.
TRAIN = [("python3.11-doc", "rst"), ("sphinx-doc", "rst"),
         ("libpython3.11-minimal", "py"), ("libpython3.11-stdlib", "py"), ("python3-django", "py"),
         ("python3-numpy", "py"), ("python3-scipy", "py"), ("python3-pandas", "py"), ("python3-matplotlib", "py"),
         ("python3-pygments", "py"), ("python3-docutils", "py"), ("python3-sphinx", "py"),
         ("python3-setuptools", "py")]
HELDOUT = [("python3-networkx", "py")]

MODEL = dict(vocab_size=50257, n_positions=512, n_ctx=512, n_embd=192, n_layer=4, n_head=6,
             activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
             tie_word_embeddings=True, bos_token_id=EOT, eos_token_id=EOT)


# --- corpus -------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _deb_files(deb: bytes) -> tarfile.TarFile:
    """The data archive of a ``.deb`` (an ``ar`` archive), read in pure Python (no dpkg needed)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    pos = 8
    while pos < len(deb):
        header = deb[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".xz"):
                body = lzma.decompress(body)
            elif name.endswith(".zst"):
                raise ValueError("zstd-compressed package: install python's zstandard or use dpkg -x")
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    raise ValueError("no data.tar member in the package")


_TEST_DIR = re.compile(r"/(tests?|testing|idle_test)/")


def _documents(deb: bytes, kind: str) -> list[tuple[str, str]]:
    out = []
    with _deb_files(deb) as tar:
        for member in tar.getmembers():
            name = member.name
            if not member.isfile():
                continue
            if kind == "rst" and "/_sources/" in name and name.endswith(".txt"):
                pass
            elif kind == "py" and name.endswith(".py") and not _TEST_DIR.search(name) \
                    and not Path(name).name.startswith("test_"):
                pass
            else:
                continue
            text = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
            if len(text) >= 200:                           # skip stubs and empty __init__.py files
                out.append((name, text))
    return out


def _fetch(package: str, cache: Path) -> tuple[bytes, str]:
    """The package's ``.deb`` (downloaded once with ``apt-get download`` into ``cache``)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if not found:
        try:
            subprocess.run(["apt-get", "download", package], cwd=cache, check=True, capture_output=True, text=True)
        except FileNotFoundError:
            sys.exit(f"apt-get not found: fetch {package}'s .deb by hand into {cache} (any Debian mirror)")
        except subprocess.CalledProcessError as e:
            sys.exit(f"apt-get download {package} failed (run `apt-get update` first?):\n{e.stderr}")
        found = sorted(cache.glob(f"{package}_*.deb"))
    path = found[-1]
    return path.read_bytes(), path.name


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(CHECKPOINT), add_bos_token=False)


def _tokenize(docs: list[str], tok) -> np.ndarray:
    ids: list[int] = []
    for start in range(0, len(docs), 256):
        for row in tok(docs[start:start + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(row)
            ids.append(EOT)
    return np.asarray(ids, dtype=np.uint16)


def build_corpus(work: Path, seed: int = 0) -> dict:
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    record: dict = {"tokenizer": "GPT-2 (tl_modular/textlm/checkpoint/vocab.json, merges.txt)", "eot": EOT,
                    "packages": {}, "splits": {}}
    for split, spec in (("train", TRAIN), ("heldout", HELDOUT)):
        docs: list[str] = []
        for package, kind in spec:
            deb, filename = _fetch(package, work / "debs")
            found = _documents(deb, kind)
            record["packages"][package] = {"file": filename, "sha256": _sha256(deb), "kind": kind,
                                           "documents": len(found), "characters": sum(len(t) for _, t in found),
                                           "split": split}
            docs += [t for _, t in found]
            print(f"{split}: {package} ({filename}): {len(found)} documents", flush=True)
        random.Random(seed).shuffle(docs)          # mixes sources; batches are random windows anyway
        ids = _tokenize(docs, tok)
        ids.tofile(corpus / f"{split}.u16")
        record["splits"][split] = {"documents": len(docs), "tokens": int(ids.size),
                                   "sha256": _sha256(ids.tobytes())}
        print(f"{split}: {ids.size:,} tokens", flush=True)
    (corpus / "corpus.json").write_text(json.dumps(record, indent=1))
    return record


# --- model and training -------------------------------------------------------------------------

def new_model(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**{**MODEL, **overrides}))


def _batch(data: torch.Tensor, step: int, seed: int, batch: int, seq: int, repeat: float = 0.0) -> torch.Tensor:
    """Rows of ``seq`` tokens: ``<|endoftext|>`` then ``seq - 1`` tokens of a random window; the
    windows depend only on (seed, step), so a resumed run sees the same batches.

    With ``repeat > 0`` that fraction of rows repeats itself: the window's first ``L`` tokens
    (``L`` uniform in 8..(seq-1)/2), then the window again from its start, running on into text
    not yet seen — the repetition real documents have (a copied block, a re-used identifier),
    which teaches copying from context (induction) instead of recall from the weights.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq, (batch,), generator=g)
    offsets = torch.arange(seq - 1).repeat(batch, 1)
    n_rep = int(round(repeat * batch))
    if n_rep:
        lengths = torch.randint(8, (seq - 1) // 2 + 1, (n_rep, 1), generator=g)
        j = offsets[:n_rep]
        offsets[:n_rep] = torch.where(j < lengths, j, j - lengths)
    rows = data[(starts[:, None] + offsets).to(data.device)]
    return torch.cat([torch.full((batch, 1), EOT, device=data.device, dtype=rows.dtype), rows], 1)


def _ids(path: Path) -> torch.Tensor:
    """A token file (``.u16``, or ``.u16.xz`` as carried to another machine)."""
    data = path.read_bytes() if path.exists() else lzma.decompress(path.with_suffix(".u16.xz").read_bytes())
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint16).astype(np.int64))


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _optimizer(model, lr: float, weight_decay: float):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def _save_checkpoint(model, opt, meta: dict, path: Path) -> None:
    """Weights, AdamW moments and the run's state: safetensors + JSON, written atomically."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"model.{n}": p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if s:
                state[f"exp_avg.{names[id(p)]}"] = s["exp_avg"].cpu().contiguous()
                state[f"exp_avg_sq.{names[id(p)]}"] = s["exp_avg_sq"].cpu().contiguous()
                steps[names[id(p)]] = float(s["step"])
    tmp = path / "state.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / "state.safetensors")
    (path / "meta.json.tmp").write_text(json.dumps({**meta, "adam_steps": steps}, indent=1))
    os.replace(path / "meta.json.tmp", path / "meta.json")


def _load_checkpoint(model, opt, path: Path) -> dict:
    from safetensors.torch import load_file

    state = load_file(str(path / "state.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[f"model.{n}"])
    for group in opt.param_groups:
        for p in group["params"]:
            n = next(k for k, q in model.named_parameters() if q is p)
            if f"exp_avg.{n}" in state:
                opt.state[p] = {"step": torch.tensor(meta["adam_steps"][n]),
                                "exp_avg": state[f"exp_avg.{n}"].to(p.device),
                                "exp_avg_sq": state[f"exp_avg_sq.{n}"].to(p.device)}
    return meta


@torch.no_grad()
def evaluate(model, data: torch.Tensor, batch: int, seq: int, n_batches: int, amp) -> float:
    """Mean next-token loss on fixed windows (positions 1.. of each row: position 0 is the BOS)."""
    model.eval()
    total = 0.0
    for i in range(n_batches):
        rows = _batch(data, i, 12345, batch, seq)
        with amp():
            total += float(model(rows, labels=rows).loss)
    model.train()
    return total / n_batches


def train(work: Path, *, device: str, steps: int | None, minutes: float | None, batch: int, seq: int, lr: float,
          weight_decay: float, warmup: int, seed: int, save_every: int, eval_every: int, out: Path | None,
          model_overrides: dict | None = None, repeat: float = 0.0, init_from: Path | None = None,
          micro_batch: int | None = None) -> dict:
    corpus = work / "corpus"
    train_ids, held = _ids(corpus / "train.u16").to(device), _ids(corpus / "heldout.u16").to(device)
    model = new_model(**(model_overrides or {}))
    if init_from is not None:                    # continue from exported weights (a new optimizer)
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(str(init_from), dtype=torch.float32)
    model = model.to(device)
    opt = _optimizer(model, lr, weight_decay)
    ckpt = work / "checkpoint"
    meta = {"step": 0, "total": steps, "log": [], "config": {**MODEL, **(model_overrides or {})},
            "settings": {"batch": batch, "seq": seq, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                         "seed": seed, "repeat": repeat, "init_from": None if init_from is None else str(init_from)}}
    if (ckpt / "meta.json").exists():
        meta = _load_checkpoint(model, opt, ckpt)
        print(f"resumed at step {meta['step']} of {meta['total']}", flush=True)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    total = steps or meta["total"] or 10**9          # --steps may extend a finished run
    started, step0 = time.time(), meta["step"]
    timed = minutes is not None and steps is None and meta["total"] is None
    model.train()
    step = meta["step"]
    while step < total:
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, lr, warmup)
        rows = _batch(train_ids, step, seed, batch, seq, repeat)
        opt.zero_grad(set_to_none=True)
        for part in rows.split(micro_batch or batch):     # gradient accumulation: same step, less memory
            with amp():
                loss = model(part, labels=part).loss
            (loss * part.shape[0] / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if timed and step in (step0 + 10, step0 + 40):     # steps 10-40 timed: past CUDA's warm-up
            if cuda:
                torch.cuda.synchronize()
            if step == step0 + 10:
                tick = time.time()
            else:
                per_step = (time.time() - tick) / 30
                left = minutes * 60 - (time.time() - started)
                total = max(step + 1, step + int(left / per_step * 0.97))   # the schedule is fixed from here
                print(f"{per_step * 1000:.1f} ms/step, {batch * seq / per_step:,.0f} tokens/s: {total} steps",
                      flush=True)
        if step % eval_every == 0 or step == total:
            entry = {"step": step, "train_loss": loss.item(), "heldout_loss": evaluate(model, held, batch, seq, 8, amp),
                     "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - started, 1)}
            meta["log"].append(entry)
            print(json.dumps(entry), flush=True)
        if step % save_every == 0 or step == total:
            meta["step"], meta["total"] = step, total
            _save_checkpoint(model, opt, meta, ckpt)
            if out is not None:
                _ship_weights(model, meta, out)
    meta["step"] = step
    return meta


def _ship_weights(model, meta: dict, out: Path, chunk: int = 15 << 20) -> None:
    """fp32 weights as one byte stream in chunks of < 16 MiB (for a file-size-limited copy back);
    ``assemble`` turns them back into a checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in model.named_parameters()]
    blob = b"".join(p.detach().float().cpu().contiguous().numpy().tobytes() for _, p in model.named_parameters())
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    for old in out.glob("weights.part*"):
        old.unlink()
    for i in range(0, len(blob), chunk):
        (out / f"weights.part{i // chunk}").write_bytes(blob[i:i + chunk])
    (out / "weights.json").write_text(json.dumps({"names": names, "shapes": shapes, "sha256": _sha256(blob),
                                                  "meta": {k: v for k, v in meta.items() if k != "adam_steps"}}))


def assemble(parts: Path, work: Path) -> None:
    """Rebuild a weights-only checkpoint from ``_ship_weights`` output (the optimizer restarts)."""
    from safetensors.torch import save_file

    info = json.loads((parts / "weights.json").read_text())
    blob = b"".join((parts / f"weights.part{i}").read_bytes()
                    for i in range(len(list(parts.glob("weights.part*")))))
    if _sha256(blob) != info["sha256"]:
        sys.exit(f"the weight chunks in {parts} do not match their checksum (a chunk is missing or cut)")
    flat = torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())
    state, pos = {}, 0
    for n in info["names"]:
        size = int(np.prod(info["shapes"][n]))
        state[f"model.{n}"] = flat[pos:pos + size].reshape(info["shapes"][n])
        pos += size
    ckpt = work / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(state, str(ckpt / "state.safetensors"))
    (ckpt / "meta.json").write_text(json.dumps({**info["meta"], "adam_steps": {}}, indent=1))


def export(work: Path, target: Path = CHECKPOINT) -> None:
    """The trained weights as a Hugging Face GPT-2 directory in fp16 (the bundled checkpoint)."""
    from safetensors.torch import load_file

    meta = json.loads((work / "checkpoint" / "meta.json").read_text())
    model = new_model(**{k: v for k, v in meta["config"].items() if k in MODEL})
    state = load_file(str(work / "checkpoint" / "state.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[f"model.{n}"])
    target.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(str(target), safe_serialization=True)
    corpus = json.loads((work / "corpus" / "corpus.json").read_text())
    stages = [{"steps": meta["step"], "settings": meta["settings"], "log": meta["log"]}]
    start = meta["settings"].get("init_from")
    if start and (Path(start) / "training.json").exists():      # a continued run: its earlier stages first
        stages = json.loads((Path(start) / "training.json").read_text())["stages"] + stages
    training = {"stages": stages, "steps": sum(st["steps"] for st in stages),
                "tokens": sum(st["steps"] * st["settings"]["batch"] * st["settings"]["seq"] for st in stages),
                "corpus": {"train_tokens": corpus["splits"]["train"]["tokens"],
                           "heldout_tokens": corpus["splits"]["heldout"]["tokens"],
                           "packages": {k: {kk: v[kk] for kk in ("file", "sha256", "split")}
                                        for k, v in corpus["packages"].items()}}}
    (target / "training.json").write_text(json.dumps(training, indent=1))
    print(f"exported to {target}: {sum(f.stat().st_size for f in target.iterdir()) / 2**20:.1f} MiB")


#: The shipped model's two stages (steps as run on one H200, where ``--minutes`` chose them).
STAGES = [dict(steps=8180, lr=2e-3, warmup=200, repeat=0.0),
          dict(steps=3741, lr=1e-3, warmup=100, repeat=0.25)]


def recipe(work: Path, device: str, micro_batch: int | None) -> None:
    """The bundled model from nothing: the corpus, then two stages — 268M tokens of plain windows,
    then 123M tokens of which a quarter of the rows repeat themselves (induction heads form: see
    ``_batch``) — exported to the bundled checkpoint. Each stage resumes where it stopped."""
    if not (work / "corpus" / "corpus.json").exists():
        build_corpus(work)
    for i, stage in enumerate(STAGES):
        stage_dir = work / f"stage{i + 1}"
        (stage_dir / "corpus").mkdir(parents=True, exist_ok=True)
        for f in (work / "corpus").iterdir():
            if not (stage_dir / "corpus" / f.name).exists():
                os.symlink(f.resolve(), stage_dir / "corpus" / f.name)
        train(stage_dir, device=device, steps=stage["steps"], minutes=None, batch=64, seq=512, lr=stage["lr"],
              weight_decay=0.1, warmup=stage["warmup"], seed=0, save_every=250, eval_every=500, out=None,
              repeat=stage["repeat"], init_from=None if i == 0 else work / "stage1" / "export",
              micro_batch=micro_batch)
        export(stage_dir, stage_dir / "export" if i == 0 else CHECKPOINT)


def _versions() -> str:
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("recipe", "corpus", "train", "export", "assemble"))
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "textlm", help="corpus, .debs and checkpoints")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="training steps in all (default: --minutes decides)")
    p.add_argument("--minutes", type=float, default=None, help="train for about this long (fixes --steps)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward pass (accumulated to --batch)")
    p.add_argument("--repeat", type=float, default=0.0, help="fraction of rows that repeat themselves (induction)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this Hugging Face GPT-2 directory")
    p.add_argument("--ship", type=Path, default=None, help="also write fp32 weights in < 16 MiB chunks here")
    p.add_argument("--to", type=Path, default=CHECKPOINT, help="where export writes (default: the bundled one)")
    p.add_argument("--tiny", action="store_true", help="a 1-layer d_model 32 model (to test the tool)")
    args = p.parse_args(argv)
    if args.command == "recipe":
        recipe(args.work, args.device, args.micro_batch)
    elif args.command == "corpus":
        build_corpus(args.work, args.seed)
    elif args.command == "train":
        if args.steps is None and args.minutes is None:
            p.error("train needs --steps or --minutes")
        overrides = dict(n_layer=1, n_embd=32, n_head=2) if args.tiny else None
        print(_versions(), flush=True)
        train(args.work, device=args.device, steps=args.steps, minutes=args.minutes, batch=args.batch, seq=args.seq,
              lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed,
              save_every=args.save_every, eval_every=args.eval_every, out=args.ship, model_overrides=overrides,
              repeat=args.repeat, init_from=args.init_from, micro_batch=args.micro_batch)
    elif args.command == "assemble":
        assemble(args.ship, args.work)
    else:
        export(args.work, args.to)


if __name__ == "__main__":
    main()
