"""Masking semantics and the masked-positions-only loss, on a RoBERTa-style tokenizer (the
demo's byte-level BPE: same special tokens and conventions as roberta-base, 948 tokens)."""

import numpy as np
import pytest
import torch
from support.data import DEMO_TOKENIZER
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from job.train.batch import MaskedBatch
from job.train.masking import EVAL_STREAM, mask_tokens
from job.train.model import SparseMLM

pytestmark = pytest.mark.unit

TOK = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
SPECIAL = np.asarray(sorted(TOK.all_special_ids))


def batch(n=64, t=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, len(TOK) - 1, size=(n, t))
    ids[:, 0], ids[:, 50], ids[:, -1] = TOK.bos_token_id, TOK.eos_token_id, TOK.eos_token_id
    return ids


def mask(ids, sample_ids, stream=0, seed=42):
    return mask_tokens(
        ids,
        sample_ids,
        seed=seed,
        stream=stream,
        special_ids=SPECIAL,
        mask_id=TOK.mask_token_id,
        vocab_size=len(TOK),
    )


def test_rates_match_the_collator():
    ids = batch(n=2000)
    inputs, labels = mask(ids, np.arange(2000))
    selected = labels != -100
    maskable = ~np.isin(ids, SPECIAL)
    rate = selected.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.003
    assert not selected[~maskable].any()  # special tokens never masked
    np.testing.assert_array_equal(labels[selected], ids[selected])
    as_mask = (inputs == TOK.mask_token_id) & selected
    kept = (inputs == ids) & selected
    changed = selected & ~as_mask & ~kept
    n = selected.sum()
    assert abs(as_mask.sum() / n - 0.8) < 0.01
    assert abs(changed.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01  # (a random draw equal to the original is rare)
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])


def test_mask_depends_on_sample_and_epoch_not_on_batch():
    ids = batch(n=8)
    whole_in, whole_lab = mask(ids, np.arange(100, 108))
    part_in, part_lab = mask(ids[3:5], np.arange(103, 105))
    np.testing.assert_array_equal(whole_in[3:5], part_in)
    np.testing.assert_array_equal(whole_lab[3:5], part_lab)
    other_epoch = mask(ids, np.arange(100, 108), stream=1)[1]
    assert (other_epoch != whole_lab).any()
    eval_a = mask(ids, np.arange(8), stream=EVAL_STREAM)[1]
    eval_b = mask(ids, np.arange(8), stream=EVAL_STREAM)[1]
    np.testing.assert_array_equal(eval_a, eval_b)
    assert (mask(ids, np.arange(8), stream=EVAL_STREAM, seed=7)[1] != eval_a).any()


def test_sparse_loss_equals_the_full_head_loss():
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(TOK),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=130,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = RobertaForMaskedLM(config)
    inputs, labels = mask(batch(n=4), np.arange(4))
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)

    full = model(input_ids=inputs, labels=labels).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    sparse_mlm = SparseMLM(model)
    assert sparse_mlm.bert  # the last-layer-at-masked-positions path is the one under test
    masked = MaskedBatch.build(inputs.numpy(), labels.numpy())
    loss_sum, count = sparse_mlm(*masked.tensors()), masked.n
    sparse = loss_sum / count
    sparse.backward()
    assert count == (labels != -100).sum()
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(
            dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name
        )
