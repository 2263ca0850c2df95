"""Writes the sync twins (service.py, hub.py, lease.py) from their asyncio sources.

    python -m tools.async_to_sync            # rewrite the sync modules
    python -m tools.async_to_sync --check    # exit 1, naming them, when one is out of date

The async module is the one source; the sync one is its text with the asyncio spelling taken
out, so the layout and the comments stay where they were written:

- ``async def``/``async with``/``async for`` lose ``async``; ``await`` goes, and with it the
  parentheses that only grouped it (``(await cur.execute(q)).fetchone()`` becomes
  ``cur.execute(q).fetchone()``); ``Awaitable[X]`` becomes ``X``;
- names are renamed by :data:`NAMES` (``AsyncConnection`` to ``Connection``, ``aspawn`` to
  ``spawn``, ``service_async`` to ``service``...), in code, in strings and in comments. What
  differs between threads and tasks beyond names lives in ``outbound_heartbeat/compat.py``,
  the two spellings side by side;
- in docstrings and comments, :data:`PHRASES` too: ``(asyncio)`` says ``(sync)``, and an
  example's ``async with`` and ``await`` go as in code;
- in docstrings and comments a name qualified with the package (``outbound_heartbeat.lease``,
  ``outbound_heartbeat.lease_async.AsyncLease``) names the other twin: it is swapped, so each
  module points at its twin;
- imports and ``__all__`` are sorted again (the renamed names may sort differently), and
  imports of names the sync code has no use for (``Awaitable``) dropped.

Only the standard library, and no formatter: the output depends on the input alone. The result
must parse, and must stay ruff- and mypy-clean (tests/unit/test_twins.py regenerates every module
and compares it with the committed file).
"""

from __future__ import annotations

import argparse
import ast
import io
import keyword
import re
import sys
import tokenize
from pathlib import Path

__all__ = ["MODULES", "NAMES", "PACKAGE", "convert", "generate", "main", "parse"]

PACKAGE = Path(__file__).resolve().parent.parent / "outbound_heartbeat"

#: The sync modules written from ``<name>_async.py``.
MODULES = ["service", "hub", "lease"]

#: Async spelling -> sync spelling, for whole identifiers.
NAMES = {
    # the twins themselves
    "service_async": "service",
    "hub_async": "hub",
    "lease_async": "lease",
    "AsyncLease": "Lease",
    "AsyncLeaseHub": "LeaseHub",
    "AsyncBatcher": "Batcher",
    "loop_hubs": "process_hubs",
    # psycopg, the pool, the standard library
    "AsyncConnection": "Connection",
    "AsyncConnectionPool": "ConnectionPool",
    "AsyncIterator": "Iterator",
    "asynccontextmanager": "contextmanager",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    # outbound_heartbeat.locks
    "async_lock_for": "lock_for",
    # outbound_heartbeat.compat
    "AEvent": "Event",
    "AFuture": "Future",
    "ALock": "Lock",
    "ARunner": "Runner",
    "ASemaphore": "Semaphore",
    "AWORKER_NAME": "WORKER_NAME",
    "AWorker": "Worker",
    "ajoin": "join",
    "arun_callback": "run_callback",
    "acall_hook": "call_hook",
    "ahook_problem": "hook_problem",
    # outbound_heartbeat.reconciliation
    "AsyncReconcileHook": "ReconcileHook",
    "asleep": "sleep",
    "aspawn": "spawn",
    "await_result": "wait_result",
}

#: Async wording -> sync wording, in docstrings and comments.
PHRASES = {"(asyncio)": "(sync)", "async with ": "with ", "await ": ""}

#: Imported names the sync code does without (``Awaitable[X]`` is written ``X``).
DROPPED_IMPORTS = {"Awaitable"}

HEADER = "# generated from {source} by tools/async_to_sync.py: do not edit\n"

_SYNC_NAMES = {sync: name for name, sync in NAMES.items()}
_TWINS = "|".join(MODULES)
_TEXT = re.compile(
    rf"(?P<qualified>\boutbound_heartbeat\.(?P<module>{_TWINS})(?P<async>_async)?\b"
    r"(?:\.(?P<member>\w+))?)"
    r"|(?P<name>\b(?:" + "|".join(sorted(NAMES, key=len, reverse=True)) + r")\b)"
)


def parse(source: str) -> ast.Module:
    """``ast.parse``, tried again when CPython 3.11's AST construction was disturbed by another
    thread's (SystemError "AST constructor recursion depth mismatch", python/cpython#106905):
    its traceback module parses source lines to place its carets, so any thread logging an
    exception at that moment can cause it (seen in the test suite: a release hook's retry)."""
    for attempt in range(5):
        try:
            return ast.parse(source)
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == 4:
                raise
    raise AssertionError("unreachable")


def generate(module: str) -> str:
    """The text of ``outbound_heartbeat/<module>.py``, written from ``<module>_async.py``."""
    source = (PACKAGE / f"{module}_async.py").read_text(encoding="utf-8")
    return convert(source, f"{module}_async.py")


def convert(source: str, name: str) -> str:
    """The sync module for the async module ``source`` (named ``name`` in the header)."""
    text = _drop_async(source)
    text = _rename(text)
    text = _sort_names(text)
    parse(text)  # a rewrite that breaks the code must fail here, not at import
    return HEADER.format(source=name) + text


# -- text and positions ----------------------------------------------------------------------------


class _Text:
    """The source with edits (deletions and replacements) gathered, then applied at once."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.starts = [0]
        for line in text.splitlines(keepends=True):
            self.starts.append(self.starts[-1] + len(line))
        self.edits: list[tuple[int, int, str]] = []

    def offset(self, lineno: int, col: int, utf8: bool = True) -> int:
        """The index in the text of (line, column); ast counts columns in UTF-8 bytes."""
        start = self.starts[lineno - 1]
        if utf8:
            line = self.text[start:self.starts[lineno]]
            col = len(line.encode("utf-8")[:col].decode("utf-8"))
        return start + col

    def replace(self, start: int, end: int, new: str = "") -> None:
        self.edits.append((start, end, new))

    def result(self) -> str:
        out = self.text
        last = len(out) + 1
        for start, end, new in sorted(self.edits, reverse=True):
            if end > last:
                raise ValueError(f"overlapping edits at {start}: {out[start:end]!r}")
            out = out[:start] + new + out[end:]
            last = start
        return out


#: The text of an f-string is a token of its own from Python 3.12 on.
_FSTRING_MIDDLE = getattr(tokenize, "FSTRING_MIDDLE", -1)


def _tokens(text: str) -> list[tokenize.TokenInfo]:
    return list(tokenize.generate_tokens(io.StringIO(text).readline))


# -- pass 1: async and await -----------------------------------------------------------------------


def _drop_async(source: str) -> str:
    text = _Text(source)
    tree = parse(source)
    tokens = _tokens(source)
    before = _token_before(text, tokens)
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef | ast.AsyncWith | ast.AsyncFor):
            start = text.offset(node.lineno, node.col_offset)
            _drop_keyword(text, start, "async")
        elif isinstance(node, ast.Await):
            start = text.offset(node.lineno, node.col_offset)
            _drop_keyword(text, start, "await")
            end = text.offset(node.end_lineno or node.lineno, node.end_col_offset or 0)
            _drop_grouping(text, node, start, end, before)
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
              and node.value.id == "Awaitable"):
            start = text.offset(node.lineno, node.col_offset)
            inner = text.offset(node.slice.lineno, node.slice.col_offset)
            end = text.offset(node.end_lineno or node.lineno, node.end_col_offset or 0)
            text.replace(start, inner)
            text.replace(end - 1, end)
    return text.result()


def _drop_keyword(text: _Text, start: int, word: str) -> None:
    if not text.text.startswith(word, start):
        raise ValueError(f"expected {word!r} at {start}: {text.text[start:start + 20]!r}")
    end = start + len(word)
    while text.text[end] == " ":
        end += 1
    text.replace(start, end)


def _token_before(text: _Text, tokens: list[tokenize.TokenInfo]) -> dict[int, tokenize.TokenInfo]:
    """For the offset of each ``(``, the significant token before it."""
    out = {}
    previous: tokenize.TokenInfo | None = None
    for token in tokens:
        if token.type in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT,
                          tokenize.DEDENT):
            continue
        if token.string == "(" and previous is not None:
            out[text.offset(*token.start, utf8=False)] = previous
        previous = token
    return out


def _drop_grouping(text: _Text, node: ast.Await, start: int, end: int,
                   before: dict[int, tokenize.TokenInfo]) -> None:
    """``(await x.y())`` -> ``x.y()``: parentheses around an await of a call, an attribute, a
    subscript or a name only grouped the await; a call's or a subscript's own are kept."""
    if not isinstance(node.value, ast.Call | ast.Attribute | ast.Subscript | ast.Name):
        return
    opening = start - 1
    while opening >= 0 and text.text[opening] == " ":
        opening -= 1
    closing = end
    while closing < len(text.text) and text.text[closing] == " ":
        closing += 1
    if opening < 0 or text.text[opening] != "(" or text.text[closing:closing + 1] != ")":
        return
    previous = before.get(opening)
    if previous is not None and (
        (previous.type == tokenize.NAME and not keyword.iskeyword(previous.string))
        or previous.string in (")", "]", "}") or previous.type == tokenize.STRING
    ):
        return  # a call's parentheses
    text.replace(opening, opening + 1)
    text.replace(closing, closing + 1)


# -- pass 2: names ---------------------------------------------------------------------------------


def _rename(source: str) -> str:
    text = _Text(source)
    tree = parse(source)
    docstrings = {
        (node.lineno, node.col_offset)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }
    for token in _tokens(source):
        start = text.offset(*token.start, utf8=False)
        end = text.offset(*token.end, utf8=False)
        if token.type == tokenize.NAME and token.string in NAMES:
            text.replace(start, end, NAMES[token.string])
        elif token.type in (tokenize.STRING, tokenize.COMMENT, _FSTRING_MIDDLE):
            prose = token.type == tokenize.COMMENT or _is_docstring(token, source, docstrings)
            old = source[start:end]  # not token.string: an f-string's text has its {{ undone
            new = _rename_text(old, prose)
            if new != old:
                text.replace(start, end, new)
    return text.result()


def _is_docstring(token: tokenize.TokenInfo, source: str, docstrings: set[tuple[int, int]]
                  ) -> bool:
    lineno, col = token.start
    line = source.splitlines()[lineno - 1]
    return (lineno, len(line[:col].encode("utf-8"))) in docstrings


def _rename_text(text: str, prose: bool) -> str:
    def renamed(match: re.Match[str]) -> str:
        if match["name"]:
            return NAMES[match["name"]]
        if not prose:  # a logger's name, say: the same in both twins
            module = match["module"] + (match["async"] or "")
            return "outbound_heartbeat." + NAMES.get(module, module) + (
                "." + NAMES.get(match["member"], match["member"]) if match["member"] else "")
        # Prose names the twin: the sync module's text names the async one and back.
        module = match["module"] + ("" if match["async"] else "_async")
        member = match["member"]
        if member:
            member = NAMES.get(member, member) if match["async"] else _SYNC_NAMES.get(
                member, member)
        return "outbound_heartbeat." + module + ("." + member if member else "")

    if prose:
        for phrase, sync in PHRASES.items():
            text = text.replace(phrase, sync)
    return _TEXT.sub(renamed, text)


# -- pass 3: sorted imports and __all__ ------------------------------------------------------------


def _member_key(name: str) -> tuple[int, str, str]:
    """isort's (and ruff's) order of imported names and of ``__all__``: constants, classes,
    the rest; case-insensitively within each."""
    if name.isupper() and len(name) > 1:
        kind = 0
    elif name[:1].isupper():
        kind = 1
    else:
        kind = 2
    return kind, name.lower(), name


def _sort_names(source: str) -> str:
    text = _Text(source)
    tree = parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            _sort_import(text, node)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "__all__"
              and isinstance(node.value, ast.List)):
            _sort_all(text, node, node.value)
    return text.result()


def _span(text: _Text, node: ast.stmt | ast.expr) -> tuple[int, int]:
    return (text.offset(node.lineno, node.col_offset),
            text.offset(node.end_lineno or node.lineno, node.end_col_offset or 0))


def _layout(head: str, items: list[str], tail: str, indent: str, one_line: bool) -> str:
    flat = head + ", ".join(items) + tail
    if one_line and len(indent) + len(flat) <= 100:
        return flat
    inner = indent + "    "
    return head + "\n" + "".join(f"{inner}{item},\n" for item in items) + indent + tail


def _sort_import(text: _Text, node: ast.ImportFrom) -> None:
    names = [a for a in node.names if a.name not in DROPPED_IMPORTS]
    ordered = sorted(names, key=lambda a: _member_key(a.name))
    if ordered == node.names:
        return
    start, end = _span(text, node)
    if not ordered:
        # The whole line goes, with its newline.
        line_start = text.starts[node.lineno - 1]
        text.replace(line_start, text.starts[node.end_lineno or node.lineno])
        return
    items = [a.name + (f" as {a.asname}" if a.asname else "") for a in ordered]
    indent = " " * node.col_offset
    module = "." * node.level + (node.module or "")
    one_line = node.lineno == node.end_lineno
    if one_line:
        new = _layout(f"from {module} import ", items, "", indent, True)
        if "\n" in new:
            new = _layout(f"from {module} import (", items, ")", indent, False)
    else:
        new = _layout(f"from {module} import (", items, ")", indent, False)
    text.replace(start, end, new)


def _sort_all(text: _Text, node: ast.Assign, value: ast.List) -> None:
    names = [e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(
        e.value, str)]
    ordered = sorted(names, key=_member_key)
    if ordered == names:
        return
    start, end = _span(text, value)
    items = [f'"{n}"' for n in ordered]
    text.replace(start, end, _layout("[", items, "]", "", node.lineno == node.end_lineno))


# -- command line ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a sync module is out of date")
    args = parser.parse_args(argv)
    stale = []
    for module in MODULES:
        path = PACKAGE / f"{module}.py"
        new = generate(module)
        if path.read_text(encoding="utf-8") == new:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {path.relative_to(PACKAGE.parent)}")
    if args.check and stale:
        for path in stale:
            print(f"{path.relative_to(PACKAGE.parent)} is out of date: run"
                  " python -m tools.async_to_sync", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
