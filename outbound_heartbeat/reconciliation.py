"""Asking the telephony provider what became of orphaned calls (``reconcile_calls``).

A *reconcile hook* is the app's callable "what became of the call with this key?": it takes a
call key (the idempotency key the dialer gave the provider) and answers a :class:`Reconciled`
(``completed``, ``failed`` or ``not_placed``, with a detail), or None when the provider does
not know yet (the call still rings: ask again later). ``service.reconcile_calls`` takes a sync
hook; ``service_async.reconcile_calls`` a sync one or a coroutine function. The hook must be
idempotent (it may be asked again about a key, by a later pass or a concurrent one) and must
answer ``not_placed`` only when the provider guarantees the key can no longer ring
(docs/operations.md, "Reconciling orphaned calls").

The CLI names a hook ``MODULE:ATTR`` (:func:`load_hook`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import arguments
from .errors import InvalidArgument
from .records import (
    CallResolution,
    OrphanedCallKey,
    ReconciledCall,
    ReconcileReport,
    ReconcileResult,
)

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_DETAIL",
    "MAX_LIMIT",
    "AsyncReconcileHook",
    "HookFactoryFailed",
    "ProviderOutcome",
    "ReconcileHook",
    "Reconciled",
    "Tally",
    "checked_answer",
    "load_hook",
]

logger = logging.getLogger("outbound_heartbeat")

#: What a provider can say became of a call.
ProviderOutcome = Literal["completed", "failed", "not_placed"]
PROVIDER_OUTCOMES: tuple[ProviderOutcome, ...] = ("completed", "failed", "not_placed")

#: Orphaned calls asked about per pass by default, and at most (list_orphaned_call_keys()).
DEFAULT_LIMIT = 100
MAX_LIMIT = 100_000
#: resolve_call()'s bound on a detail.
MAX_DETAIL = 2000


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile hook answers for one call key."""

    outcome: ProviderOutcome
    detail: str | None = None


#: A sync hook: call key -> Reconciled, or None (unknown yet: ask later).
ReconcileHook = Callable[[str], Reconciled | None]
#: What ``service_async.reconcile_calls`` accepts: a sync hook or a coroutine function.
AsyncReconcileHook = Callable[[str], Reconciled | Awaitable[Reconciled | None] | None]


class HookFactoryFailed(Exception):
    """The zero-argument factory :func:`load_hook` called raised (its error is the cause)."""


def checked_answer(value: object) -> Reconciled | None:
    """The hook's answer, or TypeError / ValueError saying what is wrong with it."""
    if value is None:
        return None
    if not isinstance(value, Reconciled):
        raise TypeError(f"the hook answered {type(value).__name__}, not Reconciled or None")
    if value.outcome not in PROVIDER_OUTCOMES:
        raise ValueError(f"the hook answered outcome {value.outcome!r}, not one of"
                         f" {', '.join(PROVIDER_OUTCOMES)}")
    if value.detail is not None and (not isinstance(value.detail, str)
                                     or len(value.detail) > MAX_DETAIL):
        raise ValueError(f"the hook's detail must be None or a string of at most {MAX_DETAIL}"
                         " characters")
    if value.detail is not None:
        try:  # what PostgreSQL cannot store (a NUL, an unpaired surrogate) is the hook's error
            arguments.text("detail", value.detail)
        except InvalidArgument as exc:
            raise ValueError(f"the hook's {exc.message}") from None
    return value


@dataclass
class Tally:
    """The counts of one reconcile pass, call by call (shared by the sync and async twins)."""

    calls: list[ReconciledCall] = field(default_factory=list)

    def add(self, orphan: OrphanedCallKey, result: ReconcileResult,
            answer: Reconciled | None = None, detail: str | None = None) -> None:
        self.calls.append(ReconciledCall(
            job_id=orphan.job_id, run_id=orphan.run_id, business_id=orphan.business_id,
            result=result, outcome=None if answer is None else answer.outcome,
            detail=detail if detail is not None else (None if answer is None else answer.detail),
        ))

    def hook_failed(self, orphan: OrphanedCallKey, exc: BaseException) -> None:
        # Never the key: it is the status callback's credential, and the hook's error may quote
        # it (an HTTP client's error names the URL it asked).
        error = f"{type(exc).__name__}: {exc}".replace(orphan.call_key, "<call key>")
        logger.warning("[CALL] reconcile hook failed for job %s (run %s, business %s): %s",
                       orphan.job_id, orphan.run_id, orphan.business_id, error)
        self.add(orphan, "hook_error", detail=error[:MAX_DETAIL])

    def resolved(self, orphan: OrphanedCallKey, answer: Reconciled,
                 resolution: CallResolution) -> None:
        result: ReconcileResult
        if resolution.answer == "resolved":
            result = "settled"
        elif resolution.answer == "requeued":
            result = "requeued"
        else:  # already_resolved, superseded: someone settled it first
            result = "already_settled"
        self.add(orphan, result, answer)

    def report(self) -> ReconcileReport:
        def count(result: ReconcileResult) -> int:
            return sum(c.result == result for c in self.calls)

        return ReconcileReport(
            asked=len(self.calls), settled=count("settled"), requeued=count("requeued"),
            already_settled=count("already_settled"), unknown=count("unknown"),
            hook_errors=count("hook_error"), locked=count("locked"), calls=tuple(self.calls),
        )


def load_hook(spec: str) -> Callable[[str], Any]:
    """The hook ``MODULE:ATTR`` names. ``ATTR`` is either the hook itself (a callable taking the
    call key) or a factory (a callable taking no argument, a class too) called once here, that
    returns the hook. ValueError when the spec names no callable; HookFactoryFailed when the
    factory raises."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not MODULE:ATTR (e.g. outbound_heartbeat.fake_provider:"
                         "hook_from_env)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from exc
    except Exception as exc:  # the module's own code failed (a missing setting, a typo)
        raise ValueError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name} has no attribute {attr}") from None
    if not callable(target):
        raise ValueError(f"{spec} is not callable")
    if _takes_no_argument(target):
        try:
            hook = target()
        except Exception as exc:
            raise HookFactoryFailed(f"{spec}() raised {type(exc).__name__}: {exc}") from exc
        if not callable(hook):
            raise ValueError(f"{spec}() returned {type(hook).__name__}, not a hook")
        return hook  # type: ignore[no-any-return]
    return target  # type: ignore[no-any-return]


def _takes_no_argument(target: Callable[..., Any]) -> bool:
    try:
        inspect.signature(target).bind()
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): a hook
        return False
    return True
