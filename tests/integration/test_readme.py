"""The README's examples run as written: the worker survives the two normal events a real
dial loop meets (its run force-cancelled under it, nothing left to claim) and goes on."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import cli, schema, service

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_every_python_block_compiles() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")


class NothingLeft(Exception):
    pass


def test_worker_example_handles_cancel_and_nothing_to_claim(
    dsn: str, conn: psycopg.Connection[Any]
) -> None:
    (worker,) = [b for b in python_blocks() if "def dial_forever" in b]
    first = service.create_run(conn, 1, [{"n": i} for i in range(3)])
    second = service.create_run(conn, 2, [{"n": i} for i in range(3)])
    dialed: list[Any] = []

    def place_call(payload: Any, stop_if: Any) -> bool:
        if not dialed:  # an operator force-cancels the first run during its first call
            service.force_cancel(conn, first.id)
        dialed.append(payload)
        return not stop_if()

    class Clock:
        @staticmethod
        def sleep(seconds: float) -> None:
            raise NothingLeft  # the example's "look again later": the test ends here

    namespace: dict[str, Any] = {"place_call": place_call}
    exec(compile(worker, "README.md", "exec"), namespace)
    namespace["time"] = Clock
    with pytest.raises(NothingLeft):
        namespace["dial_forever"](dsn)

    assert service.get_active_run(conn, 1) is None and service.get_active_run(conn, 2) is None
    statuses = dict(conn.execute("SELECT id, status FROM outbound_call_runs").fetchall())
    assert statuses == {first.id: "cancelled", second.id: "completed"}
    jobs = conn.execute(
        "SELECT status, count(*) FROM outbound_call_jobs WHERE run_id = %s GROUP BY 1",
        (second.id,),
    ).fetchall()
    assert jobs == [("completed", 3)]


def test_flask_example_runs_as_written(dsn: str, conn: psycopg.Connection[Any],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The block as a reader copies it, with only the database's address and a secret put in.
    (web_app,) = [b for b in python_blocks() if "create_blueprint" in b]
    assert web_app.count('"postgresql://app@db/app"') == 1
    monkeypatch.setenv("SECRET_KEY", "a secret for this test only")
    namespace: dict[str, Any] = {"__name__": "readme_flask_app"}
    exec(compile(web_app.replace('"postgresql://app@db/app"', repr(dsn)), "README.md", "exec"),
         namespace)
    app, pool = namespace["app"], namespace["pool"]
    try:
        client = app.test_client()
        url = "/api/outbound_calls/jobs"
        # Nobody logged in: the tenant is None, 401 (never a 500 from an unset g attribute).
        anonymous = client.get(f"{url}/active")
        assert anonymous.status_code == 401, anonymous.get_data(as_text=True)
        assert anonymous.get_json()["code"] == "unauthorized"

        run = service.create_run(conn, 7, [{"n": i} for i in range(4)])
        assert service.claim_run(conn, "w1", run.id) is not None
        other = service.create_run(conn, 8, [{}])
        with client.session_transaction() as session:  # what the app's login view does
            session["business_id"] = 7
        active = client.get(f"{url}/active")
        assert active.status_code == 200 and active.get_json()["id"] == run.id
        # Another business's run is refused, and left alone.
        assert client.post(f"{url}/{other.id}/force-cancel").status_code == 403
        cancelled = client.post(f"{url}/{run.id}/force-cancel")
        assert cancelled.status_code == 200 and cancelled.get_json()["jobs_cancelled"] == 4
        assert client.get(f"{url}/active").status_code == 404
        statuses = dict(conn.execute("SELECT id, status FROM outbound_call_runs").fetchall())
        assert statuses == {run.id: "cancelled", other.id: "pending"}
    finally:
        pool.close()


def test_yoyo_apply_as_written_says_what_it_applied(empty_dsn: str) -> None:
    # The README's yoyo command, run from the checkout with only the database's address put in.
    text = README.read_text(encoding="utf-8")
    (command,) = re.findall(r"^\.venv/bin/(yoyo apply .*--database) postgresql\+psycopg://\S+$",
                            text, re.MULTILINE)
    argv = [str(Path(sys.executable).parent / "yoyo"), *command.split()[1:], schema.yoyo_url(empty_dsn)]
    root = README.parent
    first = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    every = ["0001.install-sql", "0002.monitoring", "0003.online-upgrade", "0004.guarantees-cross",
             "0005.call-keys-and-orphans"]
    for name in every:  # what the README says to expect, for each migration
        assert f"INFO:yoyo.migrations:Applying {name}" in first.stderr, first.stderr
        assert f"Marking {name} applied" in first.stderr, first.stderr
    assert "INFO:yoyo.migrations:Applying" in text and "prints nothing when the database is" in text
    again = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=120)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    listed = subprocess.run([argv[0], "list", *argv[2:]], cwd=root, capture_output=True,
                            text=True, timeout=120)
    assert [line.split()[:2] for line in listed.stdout.splitlines()[2:]] == [["A", m] for m in every]


def test_readme_tells_how_to_watch_the_demo_in_the_console() -> None:
    # The demo serves the console only while it runs (about 15 s after printing its address).
    text = README.read_text(encoding="utf-8")
    (command,) = re.findall(r"`\.venv/bin/outbound-heartbeat (demo --pause \S+)`", text)
    args = cli.build_parser().parse_args(command.split())
    assert args.pause is not None and args.pause.total_seconds() >= 20
