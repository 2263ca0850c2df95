"""The fake provider keeps the two promises the retry relies on, across processes."""

import multiprocessing
from pathlib import Path

import pytest

from outbound_heartbeat.fake_provider import FakeProvider, KeyVoided
from outbound_heartbeat.reconciliation import Reconciled


def _dial(path: str, key: str, n: int) -> None:
    provider = FakeProvider(path)
    for _ in range(n):
        provider.dial(key, "+12025550100")


def test_a_key_dialed_from_many_processes_rings_once(tmp_path: Path) -> None:
    path = str(tmp_path / "provider.sqlite")
    FakeProvider(path)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_dial, args=(path, "oh1-1-1-1-" + "a" * 32, 5)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    calls = FakeProvider(path).calls()
    assert len(calls) == 1
    assert calls[0].dial_attempts == 15
    assert calls[0].placed


def test_not_placed_voids_the_key_and_a_late_dial_is_refused(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "p.sqlite")
    assert provider.reconcile("k1") == Reconciled(
        "not_placed", "the provider never placed this call"
    )
    with pytest.raises(KeyVoided):
        provider.dial("k1", "+12025550101")
    assert provider.calls("+12025550101") == []
    assert not provider.lookup("k1").placed  # type: ignore[union-attr]


def test_a_ringing_call_is_not_reconciled_until_it_ends(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "p.sqlite")
    provider.dial("k2", "+12025550102", callback_url="http://127.0.0.1:1/calls/k2/status")
    assert provider.reconcile("k2") is None
    provider.finish("k2", "failed")
    assert provider.reconcile("k2") == Reconciled("failed", "the provider reports the call failed")
    provider.finish("k2", "completed")  # a finished call stays as it ended
    assert provider.lookup("k2").status == "failed"  # type: ignore[union-attr]


def test_a_callback_needs_a_finished_call(tmp_path: Path) -> None:
    provider = FakeProvider(tmp_path / "p.sqlite")
    provider.dial("k3", "+12025550103")
    with pytest.raises(ValueError, match="no finished call"):
        provider.send_callback("k3")
    provider.finish("k3", "completed")
    with pytest.raises(ValueError, match="no callback URL"):
        provider.send_callback("k3")


@pytest.mark.parametrize("template", ["http://127.0.0.1:5000/x/{call_key}/{oops}",
                                      "http://127.0.0.1:5000/x/{call_key}/{0}",
                                      "http://127.0.0.1:5000/x/{call_key}/{"])
def test_the_example_worker_refuses_a_bad_callback_template_before_taking_a_job(
        template: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    # A template it cannot fill in would fail only at the first dial, after next_job() took
    # the job (left orphaned): it is a usage error of one line instead.
    from outbound_heartbeat import example_worker

    monkeypatch.setattr("sys.argv", ["example_worker", "--dsn", "postgresql://127.0.0.1:1/x",
                                     "--provider", str(tmp_path / "p.sqlite"),
                                     "--callback-url", template])
    with pytest.raises(SystemExit) as exit_:
        example_worker.parse(example_worker.parser())
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "argument --callback-url:" in err.splitlines()[-1], err
