"""The docs stay true to the code: docs/cli.md documents every flag of every command of the
real parser, with its default, and no page or code comment points a reader at notes that are
not in the repository or at how the project was made."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from pathlib import Path

import pytest

from outbound_heartbeat.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLI_DOC = ROOT / "docs" / "cli.md"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def sections(text: str) -> dict[str, str]:
    """Each `### a, b` section of the page, by every command its heading names."""
    found: dict[str, str] = {}
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    for heading, body in zip(parts[1::2], parts[2::2], strict=True):
        body = re.split(r"^## ", body, flags=re.M)[0]
        for name in heading.split(","):
            found[name.strip()] = body
    return found


def shared_section(text: str) -> str:
    return text.split("## Flags every command shares", 1)[1].split("\n## ", 1)[0]


def rendered_default(action: argparse.Action) -> str | None:
    """The default as the page writes it, or None when it has no literal value to show."""
    value = action.default
    if value is None or isinstance(value, bool) or value == argparse.SUPPRESS:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return f"{seconds:g}s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def row_of(flag: str, *texts: str) -> str | None:
    for text in texts:
        for line in text.splitlines():
            if re.match(rf"\| (`-\w`, )?`{re.escape(flag)}[` ]", line):
                return line
    return None


def test_every_subcommand_has_a_section() -> None:
    documented = sections(CLI_DOC.read_text(encoding="utf-8"))
    assert sorted(set(subcommands()) - set(documented)) == []


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_flag_of_the_command_is_documented_with_its_default(name: str) -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    section = sections(text)[name]
    shared = shared_section(text)
    for action in subcommands()[name]._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        if not action.option_strings:  # a positional: its choices are in the usage line
            for choice in action.choices or []:
                assert str(choice) in section, (name, action.dest, choice)
            continue
        flag = max(action.option_strings, key=len)
        assert flag in section, (name, flag)
        row = row_of(flag, section, shared)
        assert row is not None, f"{name}: no table row for {flag}"
        default = rendered_default(action)
        if default is not None:
            assert f"`{default}`" in row, (name, flag, default, row)
        for choice in action.choices or []:
            assert f"`{choice}`" in row, (name, flag, choice)


def test_every_flag_is_in_the_commands_usage_line() -> None:
    text = CLI_DOC.read_text(encoding="utf-8")
    for name, parser in subcommands().items():
        usage = [line for line in sections(text)[name].splitlines()
                 if line.startswith("`") and line.strip("`").split()[0] == name]
        assert usage, f"{name}: no usage line"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in usage[0], (name, flag)


def test_top_level_flags_and_the_console_token_rule() -> None:
    from outbound_heartbeat.console.server import MAX_TOKEN, MIN_TOKEN

    text = CLI_DOC.read_text(encoding="utf-8")
    shared = shared_section(text)
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert f"`{flag}`" in shared, flag
    token_row = row_of("--token", sections(text)["console"])
    assert token_row is not None and f"{MIN_TOKEN} to {MAX_TOKEN} characters" in token_row


# Spelled in pieces so this file does not match itself.
FORBIDDEN = re.compile(
    "|".join([r"DESIGN" r"\.md", r"the " r"seed", r"the " r"issue", r"main " r"\(before\)",
              r"\bh1" r"[0-9][a-z]?\b"]),
    re.IGNORECASE,
)


def cited_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder, pattern in (("outbound_heartbeat", "*.py"), ("sql", "*.sql"), ("tests", "*.py"),
                            ("benchmarks", "*.py"), ("migrations", "*.py"),
                            ("examples", "*.py")):
        files += sorted((ROOT / folder).rglob(pattern))
    return files


def test_no_page_or_comment_cites_notes_outside_the_repo() -> None:
    files = cited_files()
    assert len(files) > 50
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in files
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert hits == []


# The reference pages a newcomer scans: prose (outside code fences and table rows) stays short,
# the detail lives in its own page.
PROSE_LIMIT = 1300
REFERENCE_PAGES = ["security.md", "worker-lease.md", "sql-reference.md", "console.md", "calls.md"]
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def outside_fences(text: str) -> list[str]:
    """The page's lines, each fenced code line (and its fences) replaced by an empty line."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return lines


def prose_words(text: str) -> int:
    return sum(len(line.split()) for line in outside_fences(text)
               if not line.lstrip().startswith("|"))


def test_prose_words_skip_fences_and_table_rows() -> None:
    page = "# Title\n\nOne two three.\n\n```sql\nSELECT 1 FROM t;\n```\n\n| a | b |\n|---|---|\n"
    assert prose_words(page) == 5


@pytest.mark.parametrize("name", REFERENCE_PAGES)
def test_reference_page_prose_stays_short(name: str) -> None:
    words = prose_words((ROOT / "docs" / name).read_text(encoding="utf-8"))
    assert words <= PROSE_LIMIT, f"docs/{name}: {words} prose words, limit {PROSE_LIMIT}"


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation removed, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in outside_fences(path.read_text(encoding="utf-8")):
        m = re.match(r"^ {0,3}#{1,6} +(.+?)(?: +#+)? *$", line)
        if m:
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(path: Path) -> list[str]:
    text = "\n".join(outside_fences(path.read_text(encoding="utf-8")))
    text = re.sub(r"`[^`]*`", "", text)  # a link spelled inside inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def linking_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_anchor_rule() -> None:
    assert github_anchor("[SECURITY] refusals are audited") == "security-refusals-are-audited"
    assert github_anchor("heartbeat_leases()") == "heartbeat_leases"
    assert github_anchor("Lost answers: retries are idempotent") == (
        "lost-answers-retries-are-idempotent")


def test_every_relative_link_points_to_an_existing_file_and_heading() -> None:
    pages = linking_pages()
    assert len(pages) > 10
    checked, broken = 0, []
    for page in pages:
        for target in relative_links(page):
            file_part, _, fragment = target.partition("#")
            file = (page.parent / file_part).resolve() if file_part else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 100
    assert broken == []
