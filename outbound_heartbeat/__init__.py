"""outbound_heartbeat: keep a PostgreSQL-backed outbound call queue honest when workers die.

The logic lives in PostgreSQL functions (schema ``outbound_heartbeat``); this package is a thin
typed wrapper. Service calls: :mod:`outbound_heartbeat.service` (sync) and
:mod:`outbound_heartbeat.service_async`; errors: :mod:`outbound_heartbeat.errors`.
"""

from .errors import (
    AccessDenied,
    Error,
    InvalidArgument,
    JobNotFound,
    LeaseLost,
    NotFound,
    ReadOnlyServer,
    RunLocked,
    RunNotFound,
    UnsafeTables,
)
from .records import (
    AuditEvent,
    CallResolution,
    CancelResult,
    Claim,
    Event,
    HealthAlert,
    HeartbeatStatus,
    Job,
    JobOutcome,
    JobStatus,
    Metric,
    ReclaimedRun,
    Run,
    RunOutcome,
    RunStatus,
)
from .schema import migrate

#: The package's version, written only here (pyproject.toml reads it: hatch's dynamic version).
__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AuditEvent",
    "CallResolution",
    "CancelResult",
    "Claim",
    "Error",
    "Event",
    "HealthAlert",
    "HeartbeatStatus",
    "InvalidArgument",
    "Job",
    "JobNotFound",
    "JobOutcome",
    "JobStatus",
    "LeaseLost",
    "Metric",
    "NotFound",
    "ReadOnlyServer",
    "ReclaimedRun",
    "Run",
    "RunLocked",
    "RunNotFound",
    "RunOutcome",
    "RunStatus",
    "UnsafeTables",
    "__version__",
    "migrate",
]
