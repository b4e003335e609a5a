"""The static batch layout of a compiled step (train.compile, issue 20.6): masked positions
padded to buckets fixed by (batch, block, masking probability), padded entries ignored by
the loss. On the host: the buckets' exact values, the padded layout against the unpadded
one, the growth past a bucket; on the model (eager): the same loss and gradients padded or
not. The compiled runs themselves are in tests/integration/test_compile.py."""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import pytest
import torch
from support.data import DEMO_TOKENIZER, ROOT
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from job.train.batch import TAIL, Buckets, MaskedBatch, Masker, tail_bound
from job.train.masking import mask_tokens
from job.train.model import SparseMLM

TOK = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
SPECIAL = np.asarray(sorted(TOK.all_special_ids))


def exact_tail(n: int, p: float, k: int) -> float:
    """P(Binomial(n, p) > k), summed term by term (small terms first)."""
    terms = [math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n, k, -1)]
    return math.fsum(terms)


@pytest.mark.parametrize(("n", "p"), [(128, 0.15), (512, 0.15), (1024, 0.15), (128, 0.4)])
def test_tail_bound_is_the_smallest_k_past_which_the_binomial_tail_is_below_1e9(n, p):
    k = tail_bound(n, p)
    assert exact_tail(n, p, k) < TAIL <= exact_tail(n, p, k - 1)


def test_buckets_of_the_tutorial_block():
    # 128-token blocks at 15%: 19.2 masked a row on average, at most 47 but once in 1e9
    # rows; a batch of 8 rows: 153.6 on average, 226 bounds it.
    assert Buckets.of(8, 128, 0.15) == Buckets(rows=8, block=128, width=47, total=226)
    assert Buckets.of(64, 128, 0.15).total == tail_bound(64 * 128, 0.15) == 1427
    assert Buckets.of(2, 4, 0.15) == Buckets(2, 4, width=4, total=8)  # capped by the block


def blocks(n=8, t=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, len(TOK) - 1, size=(n, t))
    ids[:, 0], ids[:, 50], ids[:, -1] = TOK.bos_token_id, TOK.eos_token_id, TOK.eos_token_id
    return ids


def masked(ids, sample_ids, stream=0):
    return mask_tokens(
        ids,
        sample_ids,
        seed=42,
        stream=stream,
        special_ids=SPECIAL,
        mask_id=TOK.mask_token_id,
        vocab_size=len(TOK),
    )


def real_pairs(b: MaskedBatch, t: int) -> list[tuple[int, int]]:
    """(row, position) of every real query, read through positions and query_index."""
    w = b.positions.shape[1]
    q = b.query_index[: b.n]
    return list(zip((q // w).tolist(), b.positions.flatten()[q].tolist(), strict=True))


def test_static_layout_holds_the_unpadded_batch_and_pads_with_ignored_entries():
    ids, buckets = blocks(), Buckets.of(8, 128, 0.15)
    inputs, labels = masked(ids, np.arange(8))
    plain = MaskedBatch.build(inputs, labels)
    static = MaskedBatch.build(inputs, labels, buckets)
    n = plain.n
    assert static.n == n == (labels != -100).sum() and n < buckets.total
    assert static.targets.shape == static.token_index.shape == static.query_index.shape == (226,)
    assert static.positions.shape == (8, 47)
    assert torch.equal(static.input_ids, plain.input_ids)
    assert torch.equal(static.targets[:n], plain.targets)
    assert (static.targets[n:] == -100).all()  # ignored by cross_entropy: weight 0
    assert torch.equal(static.token_index[:n], plain.token_index)
    assert real_pairs(static, 128) == real_pairs(plain, 128)
    assert [r * 128 + p for r, p in real_pairs(static, 128)] == plain.token_index.tolist()
    # every row's positions are real, distinct positions: padded queries attend normally
    for row in static.positions.tolist():
        assert len(set(row)) == 47 and all(0 <= p < 128 for p in row)


def test_static_shapes_do_not_change_from_batch_to_batch():
    buckets, shapes = Buckets.of(8, 128, 0.15), set()
    for stream in range(20):
        inputs, labels = masked(blocks(seed=stream), np.arange(8), stream)
        b = MaskedBatch.build(inputs, labels, buckets)
        shapes.add(tuple(tuple(t.shape) for t in b.tensors()))
    assert shapes == {((8, 128), (226,), (226,), (8, 47), (226,))}


def test_a_row_past_the_bucket_grows_the_layout_and_drops_nothing(caplog):
    buckets = Buckets.of(2, 128, 0.15)  # width 47
    labels = np.full((2, 128), -100)
    labels[0, 1:51] = 7  # 50 masked tokens in one row
    inputs = np.zeros((2, 128), dtype=np.int64)
    with caplog.at_level(logging.WARNING, logger="mlmjob"):
        b = MaskedBatch.build(inputs, labels, buckets)
    assert b.positions.shape == (2, 56) and b.n == 50  # 50 rounded up to 8
    assert b.targets.shape == (buckets.total,) and (b.targets[:50] == 7).all()
    assert real_pairs(b, 128) == [(0, p) for p in range(1, 51)]
    assert "padded to 56 in a row" in caplog.text and "one recompile" in caplog.text
    assert MaskedBatch.build(inputs, np.full((2, 128), -100), buckets).positions.shape == (2, 47)
    # 70 in all, at most 35 a row: only the batch's bucket (60 here) grows
    labels = np.full((2, 128), -100)
    labels[:, 1:36] = 7
    b = MaskedBatch.build(inputs, labels, Buckets(2, 128, width=47, total=60))
    assert b.positions.shape == (2, 47) and b.targets.shape == (72,) and b.n == 70
    assert (b.targets[:70] == 7).all() and (b.targets[70:] == -100).all()


class Blocks:
    def __init__(self, ids):
        self.ids = ids

    def get(self, sample_ids):
        return self.ids[sample_ids]


def test_the_static_masker_lays_out_with_the_buckets_of_its_batch():
    data = Blocks(blocks(n=16))
    static = Masker.of(TOK, 42, 0.15, static=True)
    plain = Masker.of(TOK, 42, 0.15)
    a, b = static.batch(data, np.arange(4, 12), 0), plain.batch(data, np.arange(4, 12), 0)
    assert a.positions.shape == (8, 47) and a.targets.shape == (226,)
    assert a.n == b.n and torch.equal(a.targets[: a.n], b.targets)
    assert b.targets.shape == (b.n,)  # without train.compile: today's unpadded layout
    assert static.batch(data, np.arange(3), 0).positions.shape == (3, 47)


def tiny_model():
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(TOK),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return RobertaForMaskedLM(config)


def loss_and_grads(wrapper, batch):
    wrapper.zero_grad()
    loss = wrapper(*batch.tensors())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in wrapper.named_parameters()}


@pytest.mark.parametrize("path", ["bert", "encoder_and_head", "full_head"])
def test_padding_changes_neither_the_loss_sum_nor_the_gradients(path):
    wrapper = SparseMLM(tiny_model())
    # the other architectures' paths, on the same model: the token_index selection
    wrapper.bert = path == "bert"
    wrapper.parts = path != "full_head"
    inputs, labels = masked(blocks(n=4), np.arange(4))
    plain = MaskedBatch.build(inputs, labels)
    static = MaskedBatch.build(inputs, labels, Buckets.of(4, 128, 0.15))
    assert static.targets.shape[0] > plain.n
    loss, grads = loss_and_grads(wrapper, plain)
    padded_loss, padded_grads = loss_and_grads(wrapper, static)
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gpu_bench_compiles_for_cuda_graphs_on_cuda_only():
    """bench/gpu.py cannot run its GPU parts here: what it decides on the host is checked."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    assert gpu.compile_mode(torch.device("cuda")) == "reduce-overhead"
    assert gpu.compile_mode(torch.device("cpu")) is None  # CUDA graphs need CUDA
    ids = blocks()
    static = gpu.masked_batch(TOK, ids, np.arange(8), 0, static=True)
    plain = gpu.masked_batch(TOK, ids, np.arange(8), 0)
    assert static.positions.shape == (8, 47) and static.targets.shape == (226,)
    assert static.n == plain.n and torch.equal(static.targets[: plain.n], plain.targets)
