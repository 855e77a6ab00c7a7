"""The workbench's task generators and training loop (the shipped model: test_toy_model.py)."""

from __future__ import annotations

import pytest
import torch

from tl_modular import toy
from tl_modular.testing import tiny_model


@pytest.mark.parametrize("name", sorted(toy.GENERATORS))
def test_generators_are_deterministic_and_well_formed(name):
    gen = toy.GENERATORS[name]
    task = gen(50, seed=7)
    again, other = gen(50, seed=7), gen(50, seed=8)
    assert torch.equal(task.clean, again.clean) and torch.equal(task.corrupted, again.corrupted)
    assert not torch.equal(task.clean, other.clean)
    assert task.clean.shape == task.corrupted.shape
    assert (task.clean[:, 0] == toy.token_id(toy.TASK_TOKENS[name])).all()
    assert (task.corrupted[:, 0] == task.clean[:, 0]).all()
    # teacher forcing: the answer at a scored position is the next token of the clean sequence
    nxt = task.clean.gather(1, task.positions + 1)
    assert torch.equal(nxt, task.answers)
    assert torch.equal(task.corrupted.gather(1, task.positions + 1) if name != "induction"
                       else task.wrong_answers, task.wrong_answers)
    assert (task.clean < len(toy.VOCAB)).all() and (task.clean >= 0).all()


def _parse(row):
    return toy.decode(row).split()


def test_answers_follow_the_algorithms():
    for row in toy.modular_addition(200, seed=1).clean:
        _, a, _, b, _, c = _parse(row)
        assert int(c) == (int(a) + int(b)) % toy.MODULUS
    for row in toy.brackets(200, seed=1).clean:
        toks = _parse(row)
        depth = 0
        for t in toks[1:13]:
            depth += 1 if t == "(" else -1
            assert depth >= 0
        assert toks[13] == "=" and int(toks[14]) == depth
    for row in toy.sorting(200, seed=1).clean:
        toks = _parse(row)
        assert toks[6] == ">" and [int(t) for t in toks[7:]] == sorted(int(t) for t in toks[1:6])
    task = toy.induction(200, seed=1)
    for row, bad in zip(task.clean.tolist(), task.corrupted.tolist(), strict=True):
        body = row[1:]
        k = next(k for k in range(8, 12) if body[-k:] == body[-2 * k:-k])
        assert len(set(body[:-k])) == len(body[:-k])        # one earlier occurrence each
        assert not set(bad[-2 * k:-k]) & set(body[-k:])      # corrupted first copy is fresh


def test_brackets_depths_are_uniform_and_corruptions_change_them():
    task = toy.brackets(1400, seed=0)
    counts = torch.bincount(task.answers[:, 0], minlength=13)[0::2]
    assert counts.min() > 150                                  # 7 depths, 200 expected each
    assert (task.answers != task.wrong_answers).all()
    assert ((task.clean != task.corrupted).sum(1) == 2).all()  # one bracket and the answer


def test_addition_split_holds_out_thirty_percent():
    train, test = set(toy.addition_pairs("train")), set(toy.addition_pairs("test"))
    assert not train & test and len(train | test) == toy.MODULUS ** 2
    assert len(test) == round(0.3 * toy.MODULUS ** 2)
    held = toy.modular_addition(None, split="test")
    assert len(held) == len(test)
    pairs = {(int(r[1]), int(r[3])) for r in held.clean}
    assert pairs == test
    sampled = toy.modular_addition(500, seed=3)
    assert {(int(r[1]), int(r[3])) for r in sampled.clean} <= train
    with pytest.raises(ValueError, match="split"):
        toy.modular_addition(3, split="validation")


def test_vocab_roundtrip_and_errors():
    assert toy.decode(toy.encode("SRT 3 1 2 > 1 2 3")) == "SRT 3 1 2 > 1 2 3"
    assert toy.decode(torch.stack([toy.encode("ADD 1"), toy.encode("BRK (")])) == ["ADD 1", "BRK ("]
    with pytest.raises(KeyError, match="not a toy token"):
        toy.encode("ADD 99")
    with pytest.raises(ValueError, match="token ids"):
        toy.decode([1000])
    with pytest.raises(ValueError, match="positive"):
        toy.induction(0)


def _small():
    cfg = toy.default_config(seed=0)
    return tiny_model("gpt2", n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                      d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, act_fn="gelu", noise=0.0)


def test_train_runs_is_deterministic_and_calls_back():
    data = [toy.sorting(256, seed=0), toy.brackets(256, seed=1)]
    seen = []
    a = toy.train(_small(), data, steps=6, batch_size=8, eval_every=3, warmup=2, progress=False,
                  callback=lambda step, model, record: seen.append(step))
    b = toy.train(_small(), data, steps=6, batch_size=8, eval_every=3, warmup=2, progress=False)
    assert seen == [3, 6] and [r["step"] for r in a.history] == [3, 6]
    assert set(a.history[-1]["accuracy"]) == {"sorting", "brackets"}
    assert a.history[0]["loss"] > 0
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    assert not a.model.training


def test_train_resumes_exactly_from_a_checkpoint(tmp_path):
    data = toy.modular_addition(256, seed=0)
    full = toy.train(_small(), data, steps=8, batch_size=8, eval_every=4, warmup=2, progress=False)
    # Interrupted at step 4 (the callback stops it; the checkpoint is written on the way out).
    first = toy.train(_small(), data, steps=8, batch_size=8, eval_every=4, warmup=2, progress=False,
                      checkpoint_dir=tmp_path, checkpoint_every=100, callback=lambda s, m, r: s == 4)
    assert first.step == 4 and (tmp_path / "train_state.safetensors").exists()
    resumed = toy.train(_small(), data, steps=8, batch_size=8, eval_every=4, warmup=2, progress=False,
                        checkpoint_dir=tmp_path)
    assert resumed.step == 8 and [r["step"] for r in resumed.history] == [4, 8]
    for (k, v), (_, w) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="different run"):
        toy.train(_small(), data, steps=9, lr=5e-3, progress=False, checkpoint_dir=tmp_path)


def test_extra_loss_and_early_stop():
    model = _small()
    calls = []

    def penalty(m):
        calls.append(1)
        return 0.1 * m.W_E.pow(2).sum()

    out = toy.train(model, toy.sorting(64), steps=10, batch_size=4, eval_every=2, progress=False,
                    extra_loss=penalty, callback=lambda step, m, r: step >= 4)
    assert out.step == 4 and len(calls) == 4 and "extra_loss" in out.history[-1]


def test_train_rejects_bad_data_and_config():
    with pytest.raises(TypeError, match="Task"):
        toy.train(_small(), [torch.zeros(3)], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        toy.train(_small(), toy.sorting(8), steps=0, progress=False)


def test_mixed_tokens_pad_on_the_right_and_mask_padding():
    tasks = {"s": toy.sorting(5, seed=0), "a": toy.modular_addition(7, seed=0)}
    tokens, mask = toy.mixed_tokens(tasks, n_per_task=4, seed=3)
    assert tokens.shape == (8, 12) and mask.shape == tokens.shape
    assert sorted(mask.sum(1).tolist()) == [6] * 4 + [12] * 4
    pad = toy.token_id("PAD")
    assert ((tokens == pad) == (mask == 0)).all()
    assert torch.equal(mask, mask.cummin(1).values)  # padding only at the end
    again, _ = toy.mixed_tokens(tasks, n_per_task=4, seed=3)
    assert torch.equal(tokens, again)
    with pytest.raises(ValueError, match="at least one task"):
        toy.mixed_tokens([])
