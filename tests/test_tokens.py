"""Text to token rows: the whole text is read, nothing is truncated or dropped without being counted."""

from __future__ import annotations

import pytest
import torch

import tl_modular as tlm
from tl_modular import cli


def _book(n_words: int = 6000) -> str:
    words = ["river", "Mary", "stone", "walked", "the", "over", "and", "quietly", "when", "John", "gave", "bread"]
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (n_words,), generator=g).tolist()
    return " ".join(words[i] for i in picks) + "."


def test_a_text_several_times_n_ctx_is_read_whole(gpt2_small):
    text = _book()
    ids = gpt2_small.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(ids) > 4 * gpt2_small.cfg.n_ctx            # the old path read at most n_ctx of these
    rows, counts = tlm.tokens_from_text(gpt2_small, text, 4096, 128, return_counts=True)
    assert rows.shape == (32, 128) and rows.dtype == torch.long
    assert (rows[:, 0] == gpt2_small.tokenizer.bos_token_id).all()
    assert rows[:, 1:].reshape(-1).tolist() == ids[: 32 * 127]       # in order, nothing skipped
    assert (counts.read, counts.used, counts.dropped, counts.rows) == (len(ids), 32 * 127, len(ids) - 32 * 127, 32)
    assert "dropped" in str(counts)
    every = tlm.tokens_from_text(gpt2_small, text, None, 512)       # no limit: every full row
    assert every.shape == (len(ids) // 511, 512)


def test_seq_len_beyond_n_ctx_and_short_texts_are_refused(gpt2_small):
    with pytest.raises(ValueError, match=r"seq_len 2048 exceeds .* n_ctx=1024"):
        tlm.tokens_from_text(gpt2_small, _book(100), 4096, 2048)
    with pytest.raises(ValueError, match="fewer than one row"):
        tlm.tokens_from_text(gpt2_small, "too short", 4096, 128)
    with pytest.raises(ValueError, match="n_tokens"):
        tlm.tokens_from_text(gpt2_small, _book(100), 0, 16)
    with pytest.raises(ValueError, match="seq_len"):
        tlm.tokens_from_text(gpt2_small, _book(100), 64, 1)


def test_the_bundled_model_takes_text_without_bos():
    model = tlm.toy.load_model()                 # its tokenizer has no default BOS: rows are all text
    text = "( ( ) ) 3 + 4 = 7 " * 30
    rows, counts = tlm.tokens_from_text(model, text, 10**6, model.cfg.n_ctx, return_counts=True)
    assert rows.shape[1] == model.cfg.n_ctx and not counts.bos
    assert counts.used == rows.numel() and counts.read == counts.used + counts.dropped
    with pytest.raises(ValueError, match=f"n_ctx={model.cfg.n_ctx}"):
        tlm.tokens_from_text(model, text, 64, model.cfg.n_ctx + 1)


def test_cli_reads_the_whole_text_and_says_how_much(tmp_path, gpt2_small, capsys):
    path = tmp_path / "book.txt"
    path.write_text(_book())
    tokens, info = cli._load_data(str(path), gpt2_small, 4096, 128)
    assert tokens.shape == (32, 128)
    assert info["used"] == 32 * 127 and info["read"] == info["used"] + info["dropped"] and info["rows"] == 32
    assert "read" in capsys.readouterr().err
    with pytest.raises(cli.UsageError, match=r"--seq-len 2048 exceeds .* n_ctx=1024"):
        cli._load_data(str(path), gpt2_small, 4096, 2048)
