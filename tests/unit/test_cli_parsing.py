"""The operator CLI's parsing, with no server: flags, their types and bounds, usage errors
(exit 2; health: 3 UNKNOWN), durations. Every refusal happens before a connection is tried;
the commands themselves run against PostgreSQL in tests/integration/test_cli.py."""

from __future__ import annotations

import argparse
import io
from datetime import timedelta
from typing import Any

import pytest

from outbound_heartbeat import cli

#: A DSN nothing listens on: a value the parser wrongly accepted would fail to connect (exit 1,
#: health 3) instead of the usage error these tests expect, never reach a database.
NOWHERE = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def test_no_database_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    code, out = run_cli("status")
    assert code == 2 and out == ""  # a usage error, as docs/cli.md says
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dsn" in err and "DATABASE_URL" in err


@pytest.mark.parametrize(
    ("argv", "argument"),
    [(["force-cancel", "abc"], "run_id"), (["force-cancel", "0"], "run_id"),
     (["force-cancel", "99999999999999999999"], "run_id"),
     (["cancel", "5", "--business", "-3"], "--business"),
     (["status", "--business", "1.5"], "--business"),
     (["events", "--limit", "-3"], "--limit"), (["migrate", "sideways"], "action"),
     (["demo", "--threshold", "1000000h"], "--threshold"),
     # The SQL bounds, checked before anything is sent and named by the flag.
     (["prune", "--batch-size", "9223372036854775807"], "--batch-size"),
     (["prune", "--batch-size", "1000001"], "--batch-size"),
     (["events", "--limit", "100001"], "--limit"),
     (["console", "--port", "99999"], "--port"), (["console", "--port", "-1"], "--port"),
     (["demo", "--console-port", "65536"], "--console-port"),
     (["status", "--timeout", "-5s"], "--timeout")],
)
def test_usage_errors_exit_2_naming_the_argument(
    capsys: Any, argv: list[str], argument: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--dsn", NOWHERE])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argument}" in err and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line: the usage summary is in --help


@pytest.mark.parametrize(
    "value", ["banana", "999999999999999h", "0s", "-5s", "1h banana", "36526d", "5 parsecs"]
)
def test_health_input_errors_are_unknown_not_critical(capsys: Any, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["health", "--alert-after", value, "--dsn", NOWHERE])
    assert exc.value.code == 3  # Nagios UNKNOWN: exit 2 would page someone as CRITICAL
    err = capsys.readouterr().err
    assert "argument --alert-after" in err and "Traceback" not in err
    # The duration parser judged the value ('-5s' is a value, not an unknown option).
    assert f"argument --alert-after: {value!r}" in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("2min", 120), ("1.5h", 5400), ("500ms", 0.5), ("1d", 86400),
     ("1h30min", 5400), ("2 w", 1209600), ("1 day 2 hours", 93600), ("36525d", 36525 * 86400)],
)
def test_durations_parse_completely(text: str, seconds: float) -> None:
    assert cli.duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "0", "0s", "-5s", "5 parsecs", "1h banana", "90 90", "1.5.2h", "36526d",
             "999999999999999999999999h"],
)
def test_durations_refused_with_the_syntax(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        cli.duration(text)
    assert repr(text) in str(exc.value)


def test_durations_are_exact_at_the_cap_and_below_a_millisecond() -> None:
    assert cli.duration("36525d") == timedelta(days=36525)  # 100 years of 365.25 days
    assert cli.duration("1us") == timedelta(microseconds=1)
    assert cli.duration("0.1s") == timedelta(milliseconds=100)  # no float rounding on the way


@pytest.mark.parametrize(("low", "high", "text", "value"),
                         [(1, 10, "1", 1), (1, 10, " 10 ", 10), (0, 5, "0", 0)])
def test_int_between_takes_both_bounds(low: int, high: int, text: str, value: int) -> None:
    assert cli.int_between(low, high)(text) == value


@pytest.mark.parametrize("text", ["0", "11", "-1", "1.5", "ten", ""])
def test_int_between_refuses_outside_naming_both_bounds(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        cli.int_between(1, 10)(text)
    assert repr(text) in str(exc.value)


def test_subcommands_parse_with_their_defaults() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["health", "--dsn", NOWHERE])
    assert args.command == "health" and args.alert_after is None and args.max_stuck == 5
    assert args.timeout == cli.DEFAULT_TIMEOUT
    args = parser.parse_args(["events", "--limit", "100000", "--run", "7"])
    assert (args.limit, args.run, args.verify) == (100_000, 7, False)
    args = parser.parse_args(["migrate"])
    assert args.action == "apply" and args.count == 1
    args = parser.parse_args(["console", "--port", "0", "--poll", "250ms"])
    assert args.port == 0 and args.poll == timedelta(milliseconds=250) and args.locale == "en"
    args = parser.parse_args(["status"])
    assert args.business is None and args.json is False


def test_a_value_starting_with_minus_and_a_digit_is_a_value() -> None:
    # argparse alone reads "-5s" as an unknown option; this CLI judges it as a duration.
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["status", "--timeout", "-5s"])
    assert parser.parse_args(["sweep", "--timeout", "5s"]).timeout == timedelta(seconds=5)


def test_no_command_is_a_usage_error(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
