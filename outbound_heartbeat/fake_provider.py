"""A stand-in telephony provider for the demo, the example worker and the tests.

Its state lives in one SQLite file, so a dialer that is SIGKILLed, the process that reconciles
its calls and the test that checks who was called all see the same calls. It keeps the two
promises a real provider's idempotency key gives, which the library's retry relies on:

- ``dial`` with a key it has seen places nothing new (it answers the existing call);
- ``reconcile`` answering ``not_placed`` voids the key in the same transaction, so a dialer
  that was only paused (SIGSTOP) and dials that key later is refused: a call the library
  requeues under a new key can never also ring under the old one.

``FakeProvider(path).reconcile`` is a reconcile hook (:mod:`outbound_heartbeat.reconciliation`);
:func:`hook_from_env` gives the CLI one: ``outbound-heartbeat reconcile --hook
outbound_heartbeat.fake_provider:hook_from_env`` with the SQLite file's path in
``$OUTBOUND_HEARTBEAT_FAKE_PROVIDER``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, cast

from .reconciliation import Reconciled, ReconcileHook

__all__ = ["PATH_ENV", "CallStatus", "FakeProvider", "KeyVoided", "ProviderCall", "hook_from_env"]

CallStatus = Literal["ringing", "completed", "failed", "voided"]

#: The environment variable :func:`hook_from_env` reads the SQLite file's path from.
PATH_ENV = "OUTBOUND_HEARTBEAT_FAKE_PROVIDER"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    call_key      TEXT PRIMARY KEY,
    to_number     TEXT NOT NULL,
    status        TEXT NOT NULL,
    callback_url  TEXT,
    dial_attempts INTEGER NOT NULL DEFAULT 1,
    placed_at     REAL
)
"""


class KeyVoided(Exception):
    """The provider refuses a key that reconciliation declared never placed."""


@dataclass(frozen=True)
class ProviderCall:
    call_key: str
    to: str
    status: CallStatus
    callback_url: str | None
    dial_attempts: int
    #: False for a voided key: it never rang anyone.
    placed: bool


class FakeProvider:
    """A provider whose calls are rows of a SQLite file at ``path`` (created when missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with self._transaction() as db:
            db.execute(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE: the check and the write of dial/void are one step across processes.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 30000")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def dial(self, call_key: str, to: str, *, callback_url: str | None = None) -> ProviderCall:
        """Places a call under ``call_key``, or answers the call already placed under it
        (nothing new rings). Raises KeyVoided for a key reconciliation voided."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM calls WHERE call_key = ?", (call_key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO calls (call_key, to_number, status, callback_url, placed_at)"
                    " VALUES (?, ?, 'ringing', ?, julianday('now'))",
                    (call_key, to, callback_url),
                )
            elif row[0] == "voided":
                raise KeyVoided(f"call key {call_key} was declared never placed and is void")
            else:
                db.execute(
                    "UPDATE calls SET dial_attempts = dial_attempts + 1 WHERE call_key = ?",
                    (call_key,),
                )
        call = self.lookup(call_key)
        assert call is not None
        return call

    def finish(self, call_key: str, outcome: Literal["completed", "failed"]) -> None:
        """The callee answered and hung up (completed) or the call failed: what the tests and
        the demo decide in place of a real network."""
        with self._transaction() as db:
            db.execute(
                "UPDATE calls SET status = ? WHERE call_key = ? AND status = 'ringing'",
                (outcome, call_key),
            )

    def lookup(self, call_key: str) -> ProviderCall | None:
        """The call placed under this key, or None when the provider never heard of it."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT call_key, to_number, status, callback_url, dial_attempts FROM calls"
                " WHERE call_key = ?",
                (call_key,),
            ).fetchone()
        return None if row is None else _call(row)

    def calls(self, to: str | None = None) -> list[ProviderCall]:
        """Every call the provider knows (of one number), in the order they were placed."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT call_key, to_number, status, callback_url, dial_attempts FROM calls"
                " WHERE ? IS NULL OR to_number = ? ORDER BY rowid",
                (to, to),
            ).fetchall()
        return [_call(r) for r in rows]

    def reconcile(self, call_key: str) -> Reconciled | None:
        """A reconcile hook: what became of the call with this key. None while it still rings
        (ask again later); ``not_placed`` voids the key first, so it can never ring later."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM calls WHERE call_key = ?", (call_key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO calls (call_key, to_number, status) VALUES (?, '', 'voided')",
                    (call_key,),
                )
                return Reconciled("not_placed", "the provider never placed this call")
        status = row[0]
        if status == "voided":
            return Reconciled("not_placed", "the provider never placed this call")
        if status in ("completed", "failed"):
            return Reconciled(status, f"the provider reports the call {status}")
        return None

    def send_callback(
        self,
        call_key: str,
        url: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int:
        """POSTs the status callback of a finished call to ``url`` (default: the one given at
        dial time) the way the adapters' ``POST /calls/<key>/status`` expects; the HTTP status."""
        call = self.lookup(call_key)
        if call is None or call.status not in ("completed", "failed"):
            raise ValueError(f"call key {call_key}: no finished call to report")
        target = url or call.callback_url
        if target is None:
            raise ValueError(f"call key {call_key}: no callback URL given at dial time or now")
        body = json.dumps(
            {"outcome": call.status, "detail": "fake provider status callback"}
        ).encode()
        request = urllib.request.Request(
            target,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


def hook_from_env() -> ReconcileHook:
    """A zero-argument factory for the CLI's ``--hook``: the reconcile hook of the fake
    provider whose SQLite file ``$OUTBOUND_HEARTBEAT_FAKE_PROVIDER`` names (created when
    missing). ValueError when the variable is unset or empty."""
    path = os.environ.get(PATH_ENV, "")
    if not path:
        raise ValueError(f"set {PATH_ENV} to the fake provider's SQLite file")
    return FakeProvider(path).reconcile


def _call(row: tuple[str, str, str, str | None, int]) -> ProviderCall:
    key, to, status, url, attempts = row
    return ProviderCall(key, to, cast(CallStatus, status), url, attempts, placed=status != "voided")
