"""The one error table, with no server: each SQLSTATE of ours -> its exception class -> the
HTTP status and localized text every web surface answers (outbound_heartbeat.errors,
outbound_heartbeat.web). That the SQL raises these SQLSTATEs is proved against PostgreSQL in
tests/integration (test_bad_input.py, test_web.py, test_web_core.py)."""

from __future__ import annotations

import psycopg
import pytest

from outbound_heartbeat import LeaseLost, RunLocked, errors, web
from outbound_heartbeat.console.render import LOCALES

HE = web.MESSAGES["he"]
EN = web.MESSAGES["en"]

#: The table as docs/guarantees.md and the adapters' docs state it: SQLSTATE, class, HTTP.
DOCUMENTED = {
    "OH400": ("InvalidArgument", 400), "OH403": ("AccessDenied", 403),
    "OH404": ("NotFound", 404), "OH409": ("LeaseLost", 409), "OH423": ("RunLocked", 423),
    "OH428": ("UnsafeTables", 500), "OH503": ("ReadOnlyServer", 503),
    "OHS01": ("UnsafeInstall", 500),
}


def every_error_class() -> list[type[errors.Error]]:
    found, todo = [], [errors.Error]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is not errors.Error:
            found.append(cls)
    return found


def test_one_error_table_covers_every_error_class() -> None:
    """Every exception class of errors.py answers its own http_status, with a text in each
    locale of both the endpoints and the console; the table has no SQLSTATE errors.py lacks."""
    classes = every_error_class()
    assert {c.__name__ for c in classes} >= {"UnsafeInstall", "ReadOnlyServer", "LeaseLost"}
    assert set(web.ERRORS) == set(errors.BY_SQLSTATE)
    assert set(web.MESSAGES) == set(LOCALES)
    for cls in classes:
        exc = cls("refused", argument=None)
        answer = web.http_error(exc)
        assert answer.status == cls.http_status and 400 <= answer.status <= 599, cls
        for locale in LOCALES:
            reply = web.reply_for_error(exc, web.messages(locale))
            assert reply == web.Reply(answer.status, {"error": web.MESSAGES[locale][answer.text],
                                                      "code": cls.sqlstate}), (cls, locale)
    assert web.http_error(errors.LeaseLost("gone")) == web.HttpError(409, "lease_lost")
    assert web.http_error(errors.UnsafeInstall("no")).status == 500


def test_error_table_maps_every_class() -> None:
    assert web.reply_for_error(LeaseLost("gone"), HE) == web.Reply(409, {"error": HE["lease_lost"], "code": "OH409"})
    assert web.reply_for_error(RunLocked("busy"), EN) == web.Reply(423, {"error": EN["locked"], "code": "OH423"})
    with pytest.raises(ValueError, match="locale"):
        web.messages("fr")
    assert set(HE) == set(EN)


def test_the_table_is_the_documented_one() -> None:
    assert {state: (cls.__name__, cls.http_status)
            for state, cls in errors.BY_SQLSTATE.items()} == DOCUMENTED
    for state, cls in errors.BY_SQLSTATE.items():
        assert cls.sqlstate == state
    # The two kinds of NotFound answer as NotFound does.
    for cls in (errors.RunNotFound, errors.JobNotFound):
        assert (cls.sqlstate, cls.http_status) == ("OH404", 404)
        assert web.http_error(cls("gone")) == web.http_error(errors.NotFound("gone"))


def test_the_table_cannot_be_edited_at_run_time() -> None:
    with pytest.raises(TypeError):
        errors.BY_SQLSTATE["OH999"] = errors.Error  # type: ignore[index]


def test_postgresqls_read_only_error_is_read_only_server() -> None:
    exc = errors.from_psycopg(psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute UPDATE in a read-only transaction"))
    assert isinstance(exc, errors.ReadOnlyServer) and exc.http_status == 503
    assert "primary" in exc.message and "cannot execute UPDATE" in exc.message
    assert web.reply_for_error(exc, EN).status == 503


@pytest.mark.parametrize("cls", [psycopg.errors.UniqueViolation, psycopg.errors.QueryCanceled,
                                 psycopg.errors.InsufficientPrivilege])
def test_sqlstates_not_ours_are_not_translated(cls: type[psycopg.Error]) -> None:
    assert errors.from_psycopg(cls("from the server")) is None


def test_an_error_keeps_the_argument_it_names() -> None:
    exc = errors.InvalidArgument("worker_id must not be empty", argument="worker_id")
    assert (exc.message, exc.argument, str(exc)) == (
        "worker_id must not be empty", "worker_id", "worker_id must not be empty")
