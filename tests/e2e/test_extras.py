"""Each extra installs and imports alone: the package built from this tree, installed with one
extra into a fresh virtual environment, imports that extra's modules and every module that
needs no extra, and none of them pulls in another extra's framework (the ``fastapi`` extra
imports no Flask, the ``flask`` extra no FastAPI)."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

# One wheel (a module fixture) for every fresh venv: the module runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("extras")

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 480

#: extra -> (its modules, the top-level packages it is for).
EXTRAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flask": (("contrib.flask", "contrib.flask_console"), ("flask",)),
    "fastapi": (("contrib.fastapi", "contrib.fastapi_console"), ("fastapi",)),
    "redis": (("contrib.redis_slots",), ("redis",)),
    "sqlalchemy": (("contrib.sqlalchemy",), ("sqlalchemy",)),
    "otel": (("telemetry",), ("opentelemetry",)),
}
#: The modules that cannot import without their framework (redis_slots and telemetry import
#: theirs when used or when present); every other module must import with no extra at all.
NEEDS = {
    "contrib.flask": "flask",
    "contrib.flask_console": "flask",
    "contrib.fastapi": "fastapi",
    "contrib.fastapi_console": "fastapi",
    "contrib.sqlalchemy": "sqlalchemy",
}
#: What an extra must not bring along: the other web framework.
NOT_WITH = {"flask": ("fastapi", "starlette"), "fastapi": ("flask", "werkzeug")}
FRAMEWORKS = ("fastapi", "flask", "opentelemetry", "redis", "sqlalchemy", "starlette", "werkzeug")

#: Run inside the fresh venv: imports every module of the package (and makes a RedisSlots when
#: redis is there), and reports which modules failed (with the missing top-level module) and
#: which frameworks ended up imported or installed.
PROBE = r"""
import importlib, importlib.util, json, pkgutil, sys
import outbound_heartbeat
frameworks = json.loads(sys.argv[1])
failed = {}
for info in pkgutil.walk_packages(outbound_heartbeat.__path__, "outbound_heartbeat."):
    if info.name.endswith("__main__") or info.name.startswith("outbound_heartbeat.migrations"):
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        failed[info.name.removeprefix("outbound_heartbeat.")] = (exc.name or "").split(".")[0]
if importlib.util.find_spec("redis") is not None:  # redis_slots imports redis on first use
    from outbound_heartbeat.contrib.redis_slots import RedisSlots
    RedisSlots.from_url("redis://127.0.0.1:9/0", 1)  # a client; it connects at its first command
print(json.dumps({
    "failed": failed,
    "imported": sorted(f for f in frameworks if f in sys.modules),
    "installed": sorted(f for f in frameworks if importlib.util.find_spec(f) is not None),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built once from this tree (the same wheel every venv installs)."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("outbound_heartbeat-*.whl")
    return built


@pytest.mark.timeout(2 * INSTALL_TIMEOUT)
@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_each_extra_installs_and_imports_alone(extra: str, wheel: Path, tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"{wheel}[{extra}]"],
        capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    probe = subprocess.run(
        [python, "-c", PROBE, json.dumps(FRAMEWORKS)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    seen = json.loads(probe.stdout)
    installed, imported = set(seen["installed"]), set(seen["imported"])

    modules, frameworks = EXTRAS[extra]
    assert set(frameworks) <= installed and set(frameworks) <= imported, seen
    # The only modules that fail are those whose framework is not installed, for its lack:
    # this extra's modules and every module of the core import.
    assert seen["failed"] == {m: f for m, f in NEEDS.items() if f not in installed}, seen
    assert not set(modules) & set(seen["failed"]), seen
    # The other web framework is neither installed nor imported.
    assert not set(NOT_WITH.get(extra, ())) & (installed | imported), seen
