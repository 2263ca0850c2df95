"""The sync and async twins are one source: service.py, hub.py and lease.py are written from
service_async.py, hub_async.py and lease_async.py by tools/async_to_sync.py. Each committed sync
module must be, byte for byte, what the tool writes now; the tool itself must keep the code it
rewrites valid."""

from __future__ import annotations

import ast
import inspect

import pytest

from outbound_heartbeat import hub, hub_async, lease, lease_async, service, service_async
from tools import async_to_sync

REGENERATE = "python -m tools.async_to_sync"


@pytest.mark.parametrize("module", async_to_sync.MODULES)
def test_the_sync_module_is_generated_from_the_async_one(module: str) -> None:
    path = async_to_sync.PACKAGE / f"{module}.py"
    committed = path.read_text(encoding="utf-8")
    assert committed == async_to_sync.generate(module), (
        f"outbound_heartbeat/{module}.py differs from what tools/async_to_sync.py writes from"
        f" outbound_heartbeat/{module}_async.py: edit the async module, then run {REGENERATE}"
    )


@pytest.mark.parametrize("module", async_to_sync.MODULES)
def test_the_generated_module_carries_its_header(module: str) -> None:
    first = (async_to_sync.PACKAGE / f"{module}.py").read_text(encoding="utf-8").splitlines()[0]
    assert first == f"# generated from {module}_async.py by tools/async_to_sync.py: do not edit"


def test_the_check_mode_names_a_stale_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert async_to_sync.main(["--check"]) == 0
    real = async_to_sync.generate
    monkeypatch.setattr(async_to_sync, "generate",
                        lambda m: real(m) + ("# drift\n" if m == "lease" else ""))
    assert async_to_sync.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "outbound_heartbeat/lease.py is out of date" in err and REGENERATE in err
    assert "hub.py" not in err


def test_await_and_its_grouping_parentheses_go_a_calls_stay() -> None:
    source = (
        "async def f(conn: AsyncConnection) -> None:\n"
        "    row = await (await conn.execute(q)).fetchone()\n"
        "    rows = (await execute(conn, c))[0]\n"
        "    await g(await h())\n"
        "    async with conn.transaction():\n"
        "        x = not (await ready())\n"
    )
    assert async_to_sync.convert(source, "x_async.py").splitlines()[1:] == [
        "def f(conn: Connection) -> None:",
        "    row = conn.execute(q).fetchone()",
        "    rows = execute(conn, c)[0]",
        "    g(h())",
        "    with conn.transaction():",
        "        x = not ready()",
    ]


def test_names_are_renamed_in_code_strings_and_comments_but_logger_names_stay() -> None:
    source = (
        '"""Uses ``AsyncConnection``. The twin is :mod:`outbound_heartbeat.lease`."""\n'
        "from collections.abc import AsyncIterator, Awaitable, Callable\n"
        "from .compat import AEvent, ajoin, aspawn\n"
        '__all__ = ["AsyncLease", "NothingToClaim", "DEFAULT_INTERVAL"]\n'
        'logger = logging.getLogger("outbound_heartbeat.lease")\n'
        "f: Callable[[], Awaitable[int]]  # the AsyncLease's callback\n"
    )
    assert async_to_sync.convert(source, "x_async.py").splitlines()[1:] == [
        '"""Uses ``Connection``. The twin is :mod:`outbound_heartbeat.lease_async`."""',
        "from collections.abc import Callable, Iterator",
        "from .compat import Event, join, spawn",
        '__all__ = ["DEFAULT_INTERVAL", "Lease", "NothingToClaim"]',
        'logger = logging.getLogger("outbound_heartbeat.lease")',
        "f: Callable[[], int]  # the Lease's callback",
    ]


def test_the_output_parses() -> None:
    for module in async_to_sync.MODULES:
        async_to_sync.parse(async_to_sync.generate(module))


def test_the_sync_modules_use_only_the_sync_column_of_compat() -> None:
    sync_column = set(async_to_sync.NAMES.values())
    for module in async_to_sync.MODULES:
        tree = async_to_sync.parse(async_to_sync.generate(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert "asyncio" not in {a.name for a in node.names}, module
            elif isinstance(node, ast.ImportFrom) and node.module == "compat":
                names = {a.name for a in node.names}
                assert names <= sync_column, (module, names - sync_column)


def test_every_async_name_of_compat_has_its_sync_twin() -> None:
    from outbound_heartbeat import compat

    for name in compat.__all__:
        if name in async_to_sync.NAMES:
            assert async_to_sync.NAMES[name] in compat.__all__, name
        else:  # a sync name: its async twin is in the table, under the A/a prefix
            assert name in async_to_sync.NAMES.values(), name


TWINS = [(service, service_async), (hub, hub_async), (lease, lease_async)]


@pytest.mark.parametrize(("sync", "async_"), TWINS, ids=lambda m: m.__name__)
def test_the_twins_export_the_same_names(sync: object, async_: object) -> None:
    names = {async_to_sync.NAMES.get(n, n) for n in async_.__all__}  # type: ignore[attr-defined]
    assert sorted(names) == sorted(sync.__all__)  # type: ignore[attr-defined]


def test_nothing_in_the_sync_twins_is_a_coroutine_function() -> None:
    for sync, _ in TWINS:
        for name in sync.__all__:  # type: ignore[attr-defined]
            member = getattr(sync, name)
            assert not inspect.iscoroutinefunction(member), f"{sync.__name__}.{name}"
    for cls in (lease.Lease, hub.LeaseHub, hub.Batcher):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            assert not inspect.iscoroutinefunction(fn), f"{cls.__name__}.{name}"


def test_parse_tries_again_only_after_cpythons_spurious_recursion_depth_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, calls = ast.parse, []

    def flaky(source: str) -> ast.Module:
        calls.append(source)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=147, after=73)")
        return real(source)

    monkeypatch.setattr(ast, "parse", flaky)
    assert isinstance(async_to_sync.parse("x = 1"), ast.Module) and len(calls) == 2

    def broken(source: str) -> ast.Module:
        raise SystemError("something else")

    monkeypatch.setattr(ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        async_to_sync.parse("x = 1")
