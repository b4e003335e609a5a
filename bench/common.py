"""Paths to the shared real data that every benchmark reads (never copied here)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ELI5 = SHARED / "eli5" / "eli5-category-validation-2.json.gz"
TOKENIZER = SHARED / "roberta-base-tokenizer"

if not ELI5.exists() or not TOKENIZER.exists():
    raise SystemExit(f"benchmarks need the shared data beside the project: {SHARED}")
