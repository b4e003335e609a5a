"""Paths, and the data layer: the real ELI5 file and roberta-base tokenizer in $MLMJOB_TEST_DATA
(default <project>/../shared/data), skipped with one line when absent (an error under
MLMJOB_REQUIRE_DATA=1)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the project


DEMO_TOKENIZER = ROOT / "job" / "sample" / "tokenizer"


@dataclass(frozen=True)
class Inputs:
    """An ELI5 file and a tokenizer folder: what a preprocess config names."""

    eli5: Path
    tokenizer: Path


DATA = Path(os.environ.get("MLMJOB_TEST_DATA") or ROOT.parent / "shared" / "data").resolve()


REAL = Inputs(
    eli5=DATA / "eli5" / "eli5-category-validation-2.json.gz",
    tokenizer=DATA / "roberta-base-tokenizer",
)


REQUIRE_DATA = os.environ.get("MLMJOB_REQUIRE_DATA", "") not in ("", "0")


def data_missing() -> str | None:
    """One line saying what of the data layer is missing and how to provide it, or None."""
    if not DATA.is_dir():
        what = f"{DATA} not found"
    else:
        gone = [p for p in (REAL.eli5, REAL.tokenizer / "tokenizer.json") if not p.exists()]
        if not gone:
            return None
        what = f"{', '.join(str(p) for p in gone)} missing"
    return (
        f"data layer: {what}; set MLMJOB_TEST_DATA to a folder with "
        "eli5/eli5-category-validation-2.json.gz and roberta-base-tokenizer/ "
        "(see ../shared/data/README.md)"
    )


def skip_or_fail(reason: str) -> None:
    if REQUIRE_DATA:
        pytest.fail(f"MLMJOB_REQUIRE_DATA is set but {reason}", pytrace=False)
    pytest.skip(reason)  # one place, so that -rs folds every such skip into one line


def need_data() -> None:
    reason = data_missing()
    if reason:
        skip_or_fail(reason)


def need_shared(path: Path) -> Path:
    """A path of the shared folder beside the data (../shared/k8s-schemas): the data layer
    too, so skipped, or failed under MLMJOB_REQUIRE_DATA, when it is absent."""
    if not path.exists():
        skip_or_fail(
            f"data layer: {path} not found; put the shared folder beside the project "
            f"(see {path}/README.md)"
        )
    return path
