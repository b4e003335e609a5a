"""Rebuild the demo tokenizer: a 1,000-token byte-level BPE trained on eli5-sample.jsonl.

It follows roberta-base's conventions (<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last) so the
demo exercises the same code paths as distilroberta-base, offline and in seconds.
Run: python job/sample/build_tokenizer.py
The tests call `build_tokenizer` to train one on the data they generate.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).parent


def build_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, min_frequency: int = 2
):
    """Train a byte-level BPE on `texts` with roberta-base's conventions and save it to
    `out_dir` (`AutoTokenizer.from_pretrained(out_dir)` loads it). Returns the tokenizer."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    # As in roberta-base: " <mask>" takes the space before it, so "a <mask>" masks a word.
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=512)
    tok.save_pretrained(out_dir)
    return tok


def sample_texts() -> list[str]:
    """Titles and answers of eli5-sample.jsonl, in file order."""
    texts = []
    for line in (HERE / "eli5-sample.jsonl").read_text().splitlines():
        rec = json.loads(line)
        texts += [rec["title"], *rec["answers"]["text"]]
    return texts


def main() -> None:
    build_tokenizer(sample_texts(), HERE / "tokenizer", vocab_size=1000)


if __name__ == "__main__":
    main()
