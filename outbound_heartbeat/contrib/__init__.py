"""Optional integrations, each behind an extra: ``flask``, ``fastapi`` (web adapters over
:mod:`outbound_heartbeat.contrib.web`) and ``redis`` (per-business call slots)."""
