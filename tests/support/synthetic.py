"""Data the tests make themselves, so that a fresh clone needs nothing beside it.

`eli5_records` generates ELI5-Category records (the schema of the shared
eli5-category-validation-2.json.gz: q_id, category, title, title_urls, selftext,
selftext_urls, subreddit, answers{a_id, text, text_urls, score}) from a seeded RNG over a
word list, so every run makes the same bytes. `write_eli5` writes them as the shared file
is laid out: gzip of one JSON array. The tokenizer comes from `build_tokenizer` in
job/sample/build_tokenizer.py, trained on `texts(records)`.
"""

from __future__ import annotations

import gzip
import json
import random
import string
from pathlib import Path

# Commoner words first: they are drawn with Zipf-like weights, as in real text, so that a
# tiny model has something to learn. A few carry accents to keep byte-level BPE honest.
_WORD_LIST = """
the of and to a in is it that you this for are on as with they be at or your have
from but not by what all when can there their an which so if more one about out up
do time like just them some get because other into only how than then also its these
two way more most very make many water light air sun body heat energy cells brain
blood food sugar fat muscles bones skin eyes sound waves wave color red blue green
black white hot cold fast slow small big long short high low old new first last
people person child parents doctor scientist animals plants trees birds fish dogs
cats bacteria virus immune system money bank price market tax company workers job
country government law vote war city car engine fuel battery power electricity wire
computer phone screen internet data memory program code signal radio satellite
planet earth moon star stars galaxy space gravity orbit mass atom atoms electron
molecule chemical reaction acid salt oxygen carbon nitrogen pressure temperature
ice snow rain cloud wind ocean river mountain rock sand metal iron glass plastic
paper wood fire smoke sleep dream pain stress hormone nerve signal heart lungs
stomach teeth hair because therefore however although while since until after
before during through across between under over around inside outside down back
again still even much less few every each both either neither whole part half
think know feel see hear look seem want need use make made work works move moves
keep keeps turn turns happen happens cause causes change changes grow grows build
break burn freeze melt heat cool push pull spin fall rise flow carry hold store
release absorb reflect bounce travel reach hit stop start open close learn remember
explain understand imagine notice compare measure count pay buy sell cost save
spend borrow lend trade grow protect attack fight spread kill heal repair
basically actually usually really simply roughly exactly probably generally
naïve café résumé über façade 50°C ~10% 3.14 1,000 2019 24/7 e.g. i.e. etc.
"""
WORDS = list(dict.fromkeys(_WORD_LIST.split()))

TITLE_OPENERS = [
    "why does",
    "why do",
    "why is",
    "why are",
    "how does",
    "how do",
    "what is",
    "what happens when",
    "how can",
    "why can't",
]
CATEGORIES = [
    "Biology",
    "Chemistry",
    "Culture",
    "Earth Science",
    "Economics",
    "Engineering",
    "Mathematics",
    "Other",
    "Physics",
    "Psychology",
    "Repost",
    "Technology",
]
_WEIGHTS = [1 / (rank + 1) ** 0.9 for rank in range(len(WORDS))]


def _words(rng: random.Random, n: int) -> list[str]:
    return rng.choices(WORDS, weights=_WEIGHTS, k=n)


def sentence(rng: random.Random) -> str:
    words = _words(rng, rng.randint(5, 20))
    if rng.random() < 0.3:  # a clause
        words.insert(rng.randint(1, len(words) - 1), rng.choice(["because", "so", "but"]) + ",")
    text = " ".join(words).replace(" ,", ",")
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])


def answer(rng: random.Random) -> str:
    text = " ".join(sentence(rng) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.1:
        text += f' Source: "{" ".join(_words(rng, 3))}" (see the link below).'
    return text


def _id(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=n))


def eli5_records(n: int = 400, seed: int = 0) -> list[dict]:
    """`n` ELI5-Category records, the same on every call with the same seed."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        answers = [answer(rng) for _ in range(rng.randint(1, 5))]
        records.append(
            {
                "q_id": _id(rng, 6),
                "category": rng.choice(CATEGORIES),
                "title": f"{rng.choice(TITLE_OPENERS)} {' '.join(_words(rng, rng.randint(2, 8)))}?",
                "title_urls": {"url": []},
                "selftext": "",
                "selftext_urls": {"url": []},
                "subreddit": "explainlikeimfive",
                "answers": {
                    "a_id": [_id(rng, 7) for _ in answers],
                    "text": answers,
                    "text_urls": [[] for _ in answers],
                    "score": [rng.randint(1, 500) for _ in answers],
                },
            }
        )
    return records


def write_eli5(path: Path, records: list[dict]) -> Path:
    """As the shared file: gzip of one JSON array (mtime 0: the same bytes every run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps(records).encode(), mtime=0))
    return path


def texts(records: list[dict]) -> list[str]:
    """Titles and answers, what a tokenizer for these records is trained on."""
    return [t for r in records for t in (r["title"], *r["answers"]["text"])]
