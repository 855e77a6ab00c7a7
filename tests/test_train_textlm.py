"""tools/train_textlm.py: the corpus reader, the batches, and a tiny run from nothing to a loadable model."""

from __future__ import annotations

import importlib.util
import io
import lzma
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_modular as tlm

_TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_textlm.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_textlm", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _deb(files: dict[str, str]) -> bytes:
    """A minimal Debian package: an ar archive holding an xz-compressed data.tar."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", lzma.compress(raw.getvalue()))]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    return out


def test_documents_are_read_from_debian_packages(tool):
    long = "x = 1\n" * 50
    deb = _deb({"./usr/lib/python3/pkg/mod.py": long, "./usr/lib/python3/pkg/tests/test_mod.py": long,
                "./usr/lib/python3/pkg/test_other.py": long, "./usr/lib/python3/pkg/tiny.py": "a = 1",
                "./usr/share/doc/pkg/html/_sources/guide.rst.txt": "Prose. " * 40})
    assert [n for n, _ in tool._documents(deb, "py")] == ["./usr/lib/python3/pkg/mod.py"]   # no tests, no stubs
    assert [n for n, _ in tool._documents(deb, "rst")] == ["./usr/share/doc/pkg/html/_sources/guide.rst.txt"]
    with pytest.raises(ValueError, match="not a Debian package"):
        tool._deb_files(b"PK\x03\x04")


def test_batches_depend_on_step_only_and_repeat_rows_copy_their_start(tool):
    data = torch.arange(10_000)
    a, b = tool._batch(data, 7, 0, 8, 33, 0.5), tool._batch(data, 7, 0, 8, 33, 0.5)
    assert torch.equal(a, b) and (a[:, 0] == tool.EOT).all() and a.shape == (8, 33)
    plain = a[4:, 1:]
    assert (plain.diff(dim=1) == 1).all()                                  # contiguous windows
    for row in a[:4, 1:]:                                                  # w[:L] + w[:32 - L]
        length = int((row.diff() != 1).nonzero()[0]) + 1
        assert 8 <= length <= 16 and torch.equal(row[length:], row[0] + torch.arange(32 - length))


def test_a_tiny_run_trains_ships_assembles_exports_and_loads(tool, tmp_path, one_thread):
    corpus = tmp_path / "work" / "corpus"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rng.integers(0, 50257, 20_000).astype(np.uint16).tofile(corpus / "train.u16")
    rng.integers(0, 50257, 5_000).astype(np.uint16).tofile(corpus / "heldout.u16")
    (corpus / "corpus.json").write_text('{"splits": {"train": {"tokens": 20000}, "heldout": {"tokens": 5000}}, '
                                        '"packages": {}}')
    tiny = dict(n_layer=1, n_embd=16, n_head=2)
    meta = tool.train(tmp_path / "work", device="cpu", steps=4, minutes=None, batch=4, seq=32, lr=1e-3,
                      weight_decay=0.1, warmup=2, seed=0, save_every=2, eval_every=2, out=tmp_path / "ship",
                      model_overrides=tiny, micro_batch=2)
    assert meta["step"] == 4 and len(meta["log"]) == 2
    resumed = tool.train(tmp_path / "work", device="cpu", steps=6, minutes=None, batch=4, seq=32, lr=1e-3,
                         weight_decay=0.1, warmup=2, seed=0, save_every=2, eval_every=2, out=None,
                         model_overrides=tiny)
    assert resumed["step"] == 6
    # the shipped chunks rebuild the step-4 weights; export writes a Hugging Face directory that loads
    # through TransformerLens exactly as the bundled model does
    tool.assemble(tmp_path / "ship", tmp_path / "rebuilt")
    (tmp_path / "rebuilt" / "corpus").symlink_to(corpus)
    tool.export(tmp_path / "rebuilt", tmp_path / "export")
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / "export" / f).write_bytes((tlm.textlm.BUNDLED_DIR / f).read_bytes())
    model = tlm.textlm.load_model(tmp_path / "export")
    assert (model.cfg.n_layers, model.cfg.d_model) == (1, 16)
    with pytest.raises(FileNotFoundError, match="train_textlm.py export"):
        tlm.textlm.load_model(tmp_path)
