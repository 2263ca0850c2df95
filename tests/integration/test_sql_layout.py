"""sql/ as a reader meets it: one file per feature, installed in file-name order, and every
function's rights, settings, grants and comment written next to its body, never by a later
pass over the catalog. The rules several functions share are written once and called."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import calls, errors, schema

ROOT = Path(__file__).resolve().parents[2]
SQL = sorted((ROOT / "sql").glob("*.sql"))

#: Granting privileges is the schema owner's business: these run with the caller's rights.
INVOKER = {"grant_app_role", "grant_dba_role", "hand_over_tables"}

#: The statements that apply to every function of the schema at once: a safety net only.
SAFETY_NET = (
    "REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA outbound_heartbeat FROM PUBLIC;",
)


def _functions() -> list[tuple[str, str, str, str]]:
    """(file, name, header, what follows the body up to the next CREATE) for each function."""
    found = []
    for path in SQL:
        text = path.read_text()
        starts = [m.start() for m in re.finditer(r"^CREATE ", text, re.M)] + [len(text)]
        for start, end in itertools.pairwise(starts):
            statement = text[start:end]
            m = re.match(r"CREATE OR REPLACE FUNCTION outbound_heartbeat\.(\w+)\(", statement)
            if m is None:
                continue
            header = statement[: statement.index("\nAS ")]
            body_end = statement.index("\n$$;", len(header)) + 4
            found.append((path.name, m.group(1), header, statement[body_end:]))
    return found


#: The heartbeat hot paths, reworked on their own: their longer notes stay with them until then.
LONG_HEADERS = {"heartbeat", "heartbeat_leases", "_heartbeat_leases", "next_job"}


def test_every_function_has_a_short_header_comment() -> None:
    for path in SQL:
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"CREATE OR REPLACE FUNCTION outbound_heartbeat\.(\w+)\(", line)
            if m is None:
                continue
            start = i
            while start > 0 and lines[start - 1].startswith("--"):
                start -= 1
            assert 1 <= i - start <= (30 if m.group(1) in LONG_HEADERS else 3), (path.name, m.group(1))


def test_files_have_unique_numbers_and_install_in_name_order() -> None:
    numbers = [p.name.split("_", 1)[0] for p in SQL]
    assert len(numbers) == len(set(numbers)), numbers
    assert all(re.fullmatch(r"\d\d", n) for n in numbers), numbers
    assert [p.name for p in schema.sql_files()] == [p.name for p in SQL]


def test_the_sql_reference_names_every_file() -> None:
    text = (ROOT / "docs" / "sql-reference.md").read_text()
    listed = re.findall(r"^\| `(\d\d_\w+\.sql)` \|", text, re.M)
    assert listed == [p.name for p in SQL]


def test_every_function_states_its_rights_grants_and_comment_next_to_its_body() -> None:
    functions = _functions()
    assert len(functions) >= 70
    for file, name, header, after in functions:
        where = f"{file}: {name}"
        security = "SECURITY INVOKER" if name in INVOKER else "SECURITY DEFINER"
        assert security in header, where
        assert "SET search_path = pg_catalog, pg_temp" in header, where
        target = rf"outbound_heartbeat\.{name}\([^)]*\)"
        assert re.search(rf"^REVOKE ALL ON FUNCTION {target} FROM PUBLIC;", after, re.M), where
        owner = re.search(rf"^ALTER FUNCTION {target} OWNER TO outbound_heartbeat_owner;",
                          after, re.M)
        assert (owner is None) == (name in INVOKER), where
        comment = re.search(rf"^COMMENT ON FUNCTION {target} IS", after, re.M)
        assert (comment is not None) == (not name.startswith("_")), where



#: Said after the body of a public function no role is offered (the grant helpers themselves).
OFFERED_TO_NO_ROLE = "-- Offered to no role: granting is the schema owner's business."


def test_every_public_function_declares_who_may_call_it_next_to_its_body() -> None:
    """Whether app roles ('app') or DBA roles only ('dba') may call a public function is
    declared after its body, right after its REVOKE; the owner's own functions say that no role
    is. No other statement decides it: no pass over the catalog picks functions by name."""
    declared: dict[str, str] = {}
    for file, name, _, after in _functions():
        if name.startswith("_"):
            assert not re.search(r"^SELECT outbound_heartbeat\._offer_to\(", after, re.M), f"{file}: {name}"
            assert OFFERED_TO_NO_ROLE not in after, f"{file}: {name}"
            continue
        where = f"{file}: {name}"
        revoke = re.search(rf"^REVOKE ALL ON FUNCTION (outbound_heartbeat\.{name}\([^)]*\)) FROM PUBLIC;\n", after, re.M)
        assert revoke is not None, where
        following = after[revoke.end():]
        offers = re.findall(r"^SELECT outbound_heartbeat\._offer_to\('(\w+)', '([^']*)'\);$", after, re.M)
        if name in INVOKER:
            assert following.startswith(OFFERED_TO_NO_ROLE + "\n") and not offers, where
            continue
        assert len(offers) == 1 and offers[0][1] == revoke.group(1), (where, offers)
        # Right after the REVOKE, or after one comment line saying why (an operator's call).
        assert re.match(r"(--[^\n]*\n)?SELECT outbound_heartbeat\._offer_to\(", following), where
        declared[offers[0][1]] = offers[0][0]
    assert set(declared.values()) == {"app", "dba"}
    # The declarations are the only calls, and no file grants EXECUTE by a rule of its own.
    calls = sum(len(re.findall(r"^SELECT outbound_heartbeat\._offer_to\(", path.read_text(), re.M)) for path in SQL)
    assert calls == len(declared)
    granting = {name for file, name, header, _ in _functions()
                if "GRANT EXECUTE" in (ROOT / "sql" / file).read_text().split(header, 1)[1].split("\n$$;", 1)[0]}
    assert granting == {"_offer_to", "grant_app_role", "grant_dba_role"}, granting
    for path in SQL:
        outside = re.sub(r"\nAS \$\$\n.*?\n\$\$;", "", path.read_text(), flags=re.S)
        assert "GRANT EXECUTE" not in outside, path.name


def test_every_public_function_of_an_install_is_declared(conn: psycopg.Connection[Any]) -> None:
    """What the files declare is what an install holds: every public function but the owner's
    own is recorded, under its current signature, and no recorded row is left over."""
    rows = conn.execute("""
        SELECT p.proname, f.audience
          FROM pg_catalog.pg_proc AS p
          LEFT JOIN outbound_heartbeat.api_functions AS f
                 ON pg_catalog.to_regprocedure(f.signature) = p.oid
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace AND p.proname !~ '^_'""").fetchall()
    assert {name for name, audience in rows if audience is None} == INVOKER
    assert {name for name, audience in rows if audience == "dba"} == {
        "prune_events", "verify_counters", "recount_counters"}
    stale = conn.execute("SELECT signature FROM outbound_heartbeat.api_functions"
                         " WHERE pg_catalog.to_regprocedure(signature) IS NULL").fetchall()
    assert stale == []


def test_every_view_grants_the_owner_its_read_next_to_it() -> None:
    views = 0
    for path in SQL:
        text = path.read_text()
        for m in re.finditer(r"^CREATE OR REPLACE VIEW (outbound_heartbeat\.\w+)", text, re.M):
            views += 1
            following = text[m.end():].split("\nCREATE ", 1)[0]
            grant = f"GRANT SELECT ON {m.group(1)} TO outbound_heartbeat_owner;"
            assert grant in following, (path.name, m.group(1))
    assert views >= 5


def test_no_pass_over_the_catalog_sets_rights_or_comments() -> None:
    for path in SQL:
        text = path.read_text()
        for dynamic in ("'ALTER FUNCTION", "'COMMENT ON FUNCTION", "'ALTER ROUTINE"):
            assert dynamic not in text, (path.name, dynamic)


def test_no_function_relies_on_the_safety_net(empty_dsn: str, conn: psycopg.Connection[Any]) -> None:
    """sql/ without its schema-wide REVOKE installs exactly the same owners, rights, settings
    and grants: each function's own statements already did it."""
    query = """
        SELECT p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid),
               pg_catalog.pg_get_userbyid(p.proowner), p.prosecdef,
               p.proconfig, p.proacl::text, pg_catalog.obj_description(p.oid, 'pg_proc')
          FROM pg_catalog.pg_proc AS p
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace ORDER BY 1, 2"""
    with psycopg.connect(empty_dsn, autocommit=True) as bare:
        bare.execute("SET search_path = pg_catalog, pg_temp")
        removed = 0
        for path in schema.sql_files():
            text = path.read_text()
            for statement in SAFETY_NET:
                removed += text.count(statement)
                text = text.replace(statement, "")
            bare.execute(text.encode())
        without = bare.execute(query).fetchall()
    assert removed == len(SAFETY_NET)
    conn.execute("SET search_path = pg_catalog, pg_temp")  # the same spelling of types
    assert without == conn.execute(query).fetchall()


WORKER_IDS = ["", " ", "\t\n", "\u200b", "\u3000\ufeff", "a", " a ", "w-1", "x" * 200, "x" * 201,
              "é" * 200, "é" * 201, "\U0001f600" * 200, "\U0001f600" * 201, "a\u200b"]


@pytest.mark.parametrize("worker_id", WORKER_IDS, ids=range(len(WORKER_IDS)))
def test_python_worker_id_pre_check_is_the_sql_rule(
    conn: psycopg.Connection[Any], worker_id: str
) -> None:
    row = conn.execute("SELECT outbound_heartbeat._is_worker_id(%s)", (worker_id,)).fetchone()
    assert row is not None
    try:
        calls.claim_run(worker_id)
        python_accepts = True
    except errors.InvalidArgument:
        python_accepts = False
    assert python_accepts is row[0]
    assert calls.MAX_WORKER_ID == 200


@pytest.mark.parametrize("rule, helper", [
    (r"_is_blank\([^)]*\) OR pg_catalog\.length\([^)]*\) > 200", "_is_worker_id"),
    (r"RAISE EXCEPTION USING ERRCODE = 'OH403'", "_require_tenant"),
])
def test_shared_rules_are_written_once(rule: str, helper: str) -> None:
    """The worker id rule and the tenant check live in their helper; the hot paths being
    reworked separately (_heartbeat_leases) are the only other copy allowed."""
    copies = []
    for file, name, header, _ in _functions():
        body = (ROOT / "sql" / file).read_text()
        start = body.index(header)
        text = body[start: body.index("\n$$;", start)]
        if re.search(rule, text):
            copies.append(name)
    assert set(copies) <= {helper, "_heartbeat_leases"}, copies
