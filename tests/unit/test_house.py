"""The house rules of job/ (issue 19), checked on the source: small modules, short
functions, small classes, and the formatter left to format."""

import ast
from pathlib import Path

from support.data import ROOT

JOB = ROOT / "job"
# Config sections are pydantic models whose fields are the config keys (DESIGN.md's
# contract): their size is the contract's, not a design choice.
CONFIG_SECTIONS = JOB / "config" / "schema.py"


def sources() -> dict[Path, str]:
    return {p: p.read_text() for p in sorted(JOB.rglob("*.py"))}


def attributes(node: ast.ClassDef) -> set[str]:
    """Instance attributes: `self.x = ...` anywhere in the class, and dataclass fields."""
    names = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    for sub in ast.walk(node):
        target = sub if isinstance(sub, ast.Attribute) else None
        if (
            target
            and isinstance(target.ctx, ast.Store)
            and getattr(target.value, "id", "") == "self"
        ):
            names.add(target.attr)
    return names


def test_modules_functions_and_classes_are_small():
    too_big = []
    for path, text in sources().items():
        rel = path.relative_to(ROOT)
        if text.count("\n") > 450:
            too_big.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > 50:
                too_big.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
            big_class = isinstance(node, ast.ClassDef) and (
                lines > 200 or len(attributes(node)) > 15
            )
            if big_class and path != CONFIG_SECTIONS:
                n = len(attributes(node))
                too_big.append(f"{rel}:{node.lineno} {node.name}: {lines} lines, {n} attributes")
    assert too_big == []


def test_the_formatter_formats():
    skips = sum(text.count("fmt: skip") for text in sources().values())
    assert skips <= 10
