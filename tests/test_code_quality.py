"""ruff and mypy --strict are part of the test command, so a red lint fails the build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_clean() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_clean() -> None:
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_sql_raise_carries_a_sqlstate() -> None:
    # search_path pinning is checked on the installed catalog: tests/test_search_path.py.
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
