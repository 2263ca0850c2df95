"""ruff and mypy --strict are part of the test command, so a red lint fails the build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_clean() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow  # about 6 s on its own from a fresh clone (no mypy cache yet), 13 s beside the suite
def test_mypy_strict_clean() -> None:
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_sql_raise_carries_a_sqlstate() -> None:
    # search_path pinning is checked on the installed catalog: tests/integration/test_search_path.py.
    import re

    for path in sorted((ROOT / "sql").glob("*.sql")):
        text = path.read_text()
        for raise_stmt in re.findall(r"RAISE\s+(?:EXCEPTION|NOTICE)[^;]*;", text, re.S):
            assert "ERRCODE" in raise_stmt, (path.name, raise_stmt)
        assert not re.search(r"RAISE\s*;", text), path.name


def test_every_module_declares_what_it_exports() -> None:
    import importlib
    import pkgutil

    import outbound_heartbeat

    missing, dangling = [], []
    for info in pkgutil.walk_packages(outbound_heartbeat.__path__, "outbound_heartbeat."):
        if info.name.endswith("__main__") or info.name.startswith("outbound_heartbeat.migrations"):
            continue
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            if not info.ispkg or info.name == "outbound_heartbeat":
                missing.append(info.name)
            continue
        dangling += [f"{info.name}.{n}" for n in exported if not hasattr(module, n)]
    assert missing == [] and dangling == []


def test_ruff_targets_the_oldest_python_the_package_supports() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    oldest = project["project"]["requires-python"].removeprefix(">=")
    major, minor = oldest.split(".")
    assert project["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert project["tool"]["mypy"]["python_version"] == oldest


def test_the_version_is_written_once() -> None:
    import importlib.metadata
    import re
    import tomllib

    import outbound_heartbeat

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "outbound_heartbeat/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", outbound_heartbeat.__version__)
    assert importlib.metadata.version("outbound-heartbeat") == outbound_heartbeat.__version__


def test_bigint_bounds_are_defined_once() -> None:
    import re

    from outbound_heartbeat import arguments, cli

    defining = [
        path.relative_to(ROOT).as_posix()
        for path in sorted((ROOT / "outbound_heartbeat").rglob("*.py"))
        if re.search(r"^\s*MAX_BIGINT\s*[:=]", path.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert defining == ["outbound_heartbeat/arguments.py"]
    assert cli.MAX_BIGINT is arguments.MAX_BIGINT
