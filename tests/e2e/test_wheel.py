"""The wheel holds the library (the package, sql/, migrations/) and none of the code only the
tests use: that lives under tests/ (helpers.py, stalling_worker.py, workers.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools import async_to_sync

ROOT = Path(__file__).resolve().parents[2]

#: Test-only code, by module of the wheel: names no top-level function, class or method there
#: may have (tests/helpers.py holds them), and strings its source may not contain.
TEST_ONLY_NAMES = {
    "outbound_heartbeat/testing.py": {"start_standby", "promote", "crash_backend", "restart"},
}
TEST_ONLY_TEXT = {
    "outbound_heartbeat/example_worker.py": ["hang-on-job", "hang_on_job", "pause-at", "pause_at"],
    "outbound_heartbeat/worker_process.py": ["SIGCONT"],
}


# One wheel (a module fixture) for the module: its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("wheel")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("outbound_heartbeat-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def library_files() -> set[str]:
    """What the wheel must hold: the package's files, sql/ and migrations/ inside it."""
    files = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "outbound_heartbeat").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }
    files |= {f"outbound_heartbeat/sql/{p.name}" for p in (ROOT / "sql").glob("*.sql")}
    # The migrations with the frozen sql/ of each release they apply (migrations/frozen/).
    files |= {f"outbound_heartbeat/migrations/{p.relative_to(ROOT / 'migrations').as_posix()}"
              for p in (ROOT / "migrations").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    return files


def test_the_wheel_holds_the_library_and_nothing_else(wheel: zipfile.ZipFile) -> None:
    names = {n for n in wheel.namelist() if ".dist-info/" not in n}
    expected = library_files()
    assert {"outbound_heartbeat/sql/01_schema.sql", "outbound_heartbeat/testing.py",
            "outbound_heartbeat/demo.py", "outbound_heartbeat/worker_process.py",
            "outbound_heartbeat/example_worker.py"} <= expected
    assert any(n.startswith("outbound_heartbeat/migrations/0001") for n in expected)
    assert "outbound_heartbeat/migrations/frozen/0001/02_tables.sql" in expected
    assert names == expected, (sorted(expected - names), sorted(names - expected))
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/"))]


def test_the_wheel_holds_none_of_the_test_only_code(wheel: zipfile.ZipFile) -> None:
    for module, forbidden in TEST_ONLY_NAMES.items():
        tree = async_to_sync.parse(wheel.read(module).decode())
        defined = {
            node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        assert "start_server" in defined  # the documented server chain stays
        assert not defined & forbidden, f"{module} still defines {sorted(defined & forbidden)}"
    for module, texts in TEST_ONLY_TEXT.items():
        source = wheel.read(module).decode()
        assert not [t for t in texts if t in source], module


def test_the_moved_code_is_where_the_tests_find_it() -> None:
    from .. import helpers, workers

    for name in ("restart", "promote", "crash_backend"):
        assert callable(getattr(helpers.Cluster, name))
    assert callable(helpers.start_standby)
    assert Path(workers.Worker.program[0]).name == "stalling_worker.py"
    assert Path(workers.Worker.program[0]).exists()
    helped = subprocess.run(
        [sys.executable, *workers.Worker.program, "--help"], capture_output=True, text=True,
        timeout=60,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--hang-on-job" in helped.stdout
