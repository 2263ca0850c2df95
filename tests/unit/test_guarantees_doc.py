"""docs/guarantees.md is a matrix that cannot drift: every guarantee has one cell per mode, each
cell names tests that exist or says why the mode does not apply, and the summary table at the
top is exactly what the cells below say.

After editing a cell, rewrite the summary: ``python -m tests.unit.test_guarantees_doc``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "guarantees.md"

#: The modes a guarantee must hold in, in the order of every table (key, name in the tables).
MODES = [
    ("SL", "shared lease"), ("DL", "dedicated lease"),
    ("SY", "sync"), ("AS", "async"),
    ("DI", "direct"), ("PB", "PgBouncer"),
    ("SO", "separate owner"), ("AO", "app owns tables"),
    ("PR", "primary"), ("RS", "restart"), ("CR", "crash recovery"), ("FO", "failover"),
    ("AC", "autocommit"), ("TX", "in app transaction"), ("NE", "nested"),
    ("FK", "after fork"),
]
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
NOT_APPLICABLE = "does not apply:"
GAP = "gap:"
MARK = {"test": "✓", "n/a": "n/a", "gap": "✗"}


def guarantees() -> dict[str, dict[str, str]]:
    """Each guarantee's title -> {mode name: cell text}, from the '### ' sections."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split("\n## The guarantees\n", 1)[1]
    found: dict[str, dict[str, str]] = {}
    for section in body.split("\n### ")[1:]:
        title, _, rest = section.partition("\n")
        cells: dict[str, str] = {}
        for line in rest.splitlines():
            parts = [p.strip() for p in line.strip().strip("|").split("|")]
            if len(parts) == 2 and parts[0] in dict((n, k) for k, n in MODES):
                cells[parts[0]] = parts[1]
        found[title.strip()] = cells
    return found


def kind(cell: str) -> str:
    if cell.startswith(NOT_APPLICABLE):
        return "n/a"
    if cell.startswith(GAP):
        return "gap"
    return "test"


def summary(found: dict[str, dict[str, str]]) -> str:
    head = "| guarantee | " + " | ".join(k for k, _ in MODES) + " |"
    rule = "|---|" + "---|" * len(MODES)
    rows = [
        f"| [{title}](#{anchor(title)}) | "
        + " | ".join(MARK[kind(cells[name])] for _, name in MODES) + " |"
        for title, cells in found.items()
    ]
    return "\n".join([head, rule, *rows])


def anchor(title: str) -> str:
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_every_guarantee_has_one_cell_per_mode_in_order() -> None:
    found = guarantees()
    assert len(found) >= 20
    for title, cells in found.items():
        assert list(cells) == [name for _, name in MODES], title


def test_every_cell_names_existing_tests_or_says_why_not() -> None:
    for title, cells in guarantees().items():
        for mode, cell in cells.items():
            if kind(cell) == "n/a":
                assert len(cell) > len(NOT_APPLICABLE) + 20, (title, mode, "say why")
                continue
            if kind(cell) == "gap":
                continue
            refs = TEST_REF.findall(cell)
            assert refs, (title, mode, cell)
            for path, name in refs:
                source = (ROOT / path).read_text(encoding="utf-8")
                assert re.search(rf"^(async )?def {name}\(", source, re.MULTILINE), (
                    f"{title} / {mode}: {path}::{name} does not exist")


def counts_line(found: dict[str, dict[str, str]]) -> str:
    counts = {k: sum(kind(c) == k for cells in found.values() for c in cells.values())
              for k in MARK}
    return (f"{len(found)} guarantees x {len(MODES)} modes = {sum(counts.values())} cells:"
            f" {counts['test']} with a test, {counts['n/a']} that do not apply,"
            f" {counts['gap']} gaps.")


def rendered(text: str, found: dict[str, dict[str, str]]) -> str:
    """The document with its summary block rewritten from its cells."""
    head, rest = text.split(SUMMARY_START, 1)
    _, tail = rest.split(SUMMARY_END, 1)
    block = f"{summary(found)}\n\n{counts_line(found)}\n"
    return f"{head}{SUMMARY_START}\n{block}{SUMMARY_END}{tail}"


def test_the_summary_is_what_the_cells_say() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert rendered(text, guarantees()) == text, "run: python -m tests.unit.test_guarantees_doc"


SUMMARY_START, SUMMARY_END = "<!-- summary: generated from the cells -->", "<!-- /summary -->"

if __name__ == "__main__":
    DOC.write_text(rendered(DOC.read_text(encoding="utf-8"), guarantees()), encoding="utf-8")
