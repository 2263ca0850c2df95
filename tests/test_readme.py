"""The README's examples run as written: the worker survives the two normal events a real
dial loop meets (its run force-cancelled under it, nothing left to claim) and goes on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import service

README = Path(__file__).resolve().parent.parent / "README.md"


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
