"""Inference memory (issue 20, item 5): the head in chunks of mask rows, and out-of-memory
errors answered by halving the batch, down to a line alone, which then gets an `error`.

A real out-of-memory error needs a GPU (on a CPU the kernel kills the process first): the
forwards here raise `torch.OutOfMemoryError` themselves above a size. That is the one mock;
everything else is the job's code on a tiny real model."""

import json
from types import SimpleNamespace

import pytest
import torch
from support.data import DEMO_TOKENIZER
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from job.infer import fill_mask
from job.infer.fill_mask import FillMask, fitted_batches, run_part


def oom_above(limit: int, forward, calls: list | None = None, alone=()):
    """`forward`, raising CUDA's out-of-memory error on batches of more than `limit` items
    and on any batch holding one of `alone` (the mock: see the module's docstring)."""

    def run(batch):
        if calls is not None:
            calls.append(list(batch))
        if len(batch) > limit or any(x in alone for x in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return forward(batch)

    return run


def test_an_oom_halves_the_batch_and_later_batches_keep_the_size_that_fit():
    calls, freed = [], []
    forward = oom_above(3, lambda batch: [x * 10 for x in batch], calls)
    got = list(fitted_batches(forward, list(range(11)), 8, lambda: freed.append(1)))
    assert [len(c) for c in calls] == [8, 4, 2, 2, 2, 2, 2, 1]
    assert got == [
        ([0, 1], [0, 10]),
        ([2, 3], [20, 30]),
        ([4, 5], [40, 50]),
        ([6, 7], [60, 70]),
        ([8, 9], [80, 90]),
        ([10], [100]),
    ]
    assert len(freed) == 2  # once before each retry


def test_an_item_out_of_memory_alone_gives_none_and_the_rest_go_on():
    calls = []
    forward = oom_above(4, lambda batch: [-x for x in batch], calls, alone={5})
    got = list(fitted_batches(forward, list(range(8)), 4))
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6], [7]]
    assert got == [
        ([0, 1, 2, 3], [0, -1, -2, -3]),
        ([4], [-4]),
        ([5], None),
        ([6], [-6]),
        ([7], [-7]),
    ]


def test_other_errors_are_not_taken_for_out_of_memory():
    def forward(batch):
        raise RuntimeError("a bug, not memory")

    with pytest.raises(RuntimeError, match="a bug, not memory"):
        list(fitted_batches(forward, [1, 2], 2))


def save_model(folder, vocab_size=None, positions=130):
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.5,  # spread logits: no near-ties among the top candidates
    )
    RobertaForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def fill(tmp_path_factory) -> FillMask:
    folder = tmp_path_factory.mktemp("model")
    save_model(folder)
    return FillMask(str(folder), folder / "cache", top_k=3, device="cpu", precision="fp32")


class Progress:
    """What the job's tqdm bar is told: lines done."""

    n = 0

    def update(self, k: int) -> None:
        self.n += k


LINES = [
    "The <mask> is bright tonight.",
    "no mask here",
    "<mask> <mask> <mask> <mask> <mask> <mask> <mask> the sky <mask> <mask> <mask>.",
    "Why is the sky <mask>?",
    "A much longer line about stars and planets, where the <mask> is near the <mask> end.",
    "<mask>",
]


def test_the_head_works_in_chunks_of_rows_and_gives_the_whole_batch_answer(fill, monkeypatch):
    ids = [x for x in fill.encode([fill_mask.Line(n, t) for n, t in enumerate(LINES)]) if x]
    rows = sum(seq.count(fill.tok.mask_token_id) for seq in ids)
    assert rows == 15
    monkeypatch.setattr(fill, "chunk_rows", rows)  # one chunk: the unchunked computation
    whole = fill.predict(ids)
    seen = []
    hook = fill.parts[1].register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    monkeypatch.setattr(fill, "chunk_rows", 4)
    try:
        chunked = fill.predict(ids)
    finally:
        hook.remove()
    assert seen == [4, 4, 4, 3]  # never more rows x vocabulary at once than the bound
    assert len(chunked) == len(whole) == 5
    for (v, t), (wv, wt) in zip(chunked, whole, strict=True):
        assert t.tolist() == wt.tolist()
        torch.testing.assert_close(torch.from_numpy(v), torch.from_numpy(wv))


def test_the_chunk_is_bounded_in_bytes_of_the_vocabulary(tmp_path):
    # roberta-base's 50,265 tokens: 256 MiB of logits and fp32 probabilities per chunk are
    # 667 rows in fp32 (4 + 4 bytes a token), 890 in bf16 (2 + 4)
    save_model(tmp_path, vocab_size=50_265)
    rows = {
        p: FillMask(str(tmp_path), tmp_path / "c", 3, "cpu", p).chunk_rows for p in ("fp32", "bf16")
    }
    assert rows == {"fp32": 667, "bf16": 890}


def test_a_line_out_of_memory_alone_gets_an_error_and_the_part_completes(
    fill, tmp_path, monkeypatch
):
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(LINES) + "\n")
    cfg = SimpleNamespace(infer=SimpleNamespace(text_field="text", batch_size=4))
    want, want_errors = run_part(fill, str(src), cfg, Progress())

    longest = max(fill.encode([fill_mask.Line(1, t) for t in LINES]), key=lambda x: len(x or []))
    real = fill.predict
    # more than 2 lines, or the longest line even alone, is more than the "GPU" holds
    forward = oom_above(2, real, alone={tuple(longest)})
    monkeypatch.setattr(fill, "predict", lambda batch: forward([tuple(s) for s in batch]))
    counted = Progress()
    got, errors = run_part(fill, str(src), cfg, counted)

    assert counted.n == len(LINES)  # every line accounted for
    assert errors == want_errors + 1 == 2
    n_tokens, n_masks = len(longest), longest.count(fill.tok.mask_token_id)
    assert (n_tokens, n_masks) == (24, 2)
    assert got[4] == {
        "file": str(src),
        "line": 5,
        "error": f"out of memory on cpu even alone ({n_tokens} tokens, {n_masks} masks)",
    }
    # The same answers: tokens exactly; scores to 1e-5, since a batch of 2 and one of 4 pad
    # differently and fp32 CPU kernels then sum in another order (the last digits move).
    assert _tokens(got[:4] + got[5:]) == _tokens(want[:4] + want[5:])
    assert _scores(got[:4] + got[5:]) == pytest.approx(_scores(want[:4] + want[5:]), rel=1e-5)
    assert [r["line"] for r in got] == list(range(1, 7))


def _tokens(rows: list[dict]) -> str:
    return json.dumps([_strip(r) for r in rows])


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "score"}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _scores(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in ([v] if k == "score" else _scores(v))]
    if isinstance(obj, list):
        return [x for v in obj for x in _scores(v)]
    return []
