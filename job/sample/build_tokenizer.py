"""Rebuild the demo tokenizer: a 1,000-token byte-level BPE trained on eli5-sample.jsonl.

It follows roberta-base's conventions (<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last) so the
demo exercises the same code paths as distilroberta-base, offline and in seconds.
Run: python job/sample/build_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import AddedToken, ByteLevelBPETokenizer, processors
from transformers import RobertaTokenizerFast

HERE = Path(__file__).parent


def main() -> None:
    texts = []
    for line in (HERE / "eli5-sample.jsonl").read_text().splitlines():
        rec = json.loads(line)
        texts += [rec["title"], *rec["answers"]["text"]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=1000, min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )  # fmt: skip
    # As in roberta-base: " <mask>" takes the space before it, so "a <mask>" masks a word.
    bpe.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=512)
    tok.save_pretrained(HERE / "tokenizer")


if __name__ == "__main__":
    main()
