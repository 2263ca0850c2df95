"""Where testing.start_local_cluster puts a private cluster: in memory when it flushes nothing
and there is room, on disk otherwise (a durable benchmark server measures the disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbound_heartbeat import testing


@pytest.fixture
def memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(testing, "MEMORY_DIR", tmp_path)
    monkeypatch.setattr(testing, "MEMORY_MIN_FREE", 1)
    return tmp_path


def test_a_cluster_that_flushes_nothing_goes_to_memory(memory: Path) -> None:
    assert testing._cluster_parent({}) == str(memory)
    assert testing._cluster_parent({"fsync": "off", "max_connections": "20"}) == str(memory)


def test_a_cluster_that_flushes_goes_to_disk(memory: Path) -> None:
    assert testing._cluster_parent({"fsync": "on"}) is None


def test_without_room_or_without_the_directory_the_cluster_goes_to_disk(
    memory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(testing, "MEMORY_MIN_FREE", 1 << 62)
    assert testing._cluster_parent({}) is None
    monkeypatch.setattr(testing, "MEMORY_MIN_FREE", 1)
    monkeypatch.setattr(testing, "MEMORY_DIR", memory / "missing")
    assert testing._cluster_parent({}) is None

