"""A complete worker: claim a run, dial its jobs with a fake dialer, heartbeat in the
background, stop at once when the lease is lost, release with the right final status.

    python -m outbound_heartbeat.example_worker --dsn postgresql://postgres@127.0.0.1/app \
        --worker-id dialer-1

With ``--provider PATH`` it dials through the fake telephony provider
(:mod:`outbound_heartbeat.fake_provider`, a SQLite file shared by processes) instead: each call
goes out under the job's call key (the provider's idempotency key), the provider's status
callback is POSTed to ``--callback-url`` (``POST <base>/calls/<key>/status``, the adapters'
endpoint), then the worker finishes the job with the provider's outcome. Its step lines name
each point of a call: ``next_job``, ``placed``, ``call_ended``, ``callback``, ``finish_job``.

It is the model for a real worker (replace ``fake_dial``, or pass your own dialer to
:func:`run`), and the process the demo starts and kills
(:class:`outbound_heartbeat.worker_process.WorkerProcess`). Prints one JSON line per step on
stdout (the demo and the tests read them). Exit status: 0 when the run was released, 2 when
there was nothing to claim, 3 when the lease was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeAlias

from outbound_heartbeat import LeaseLost
from outbound_heartbeat.lease import (
    Lease,
    NothingToClaim,
    default_worker_id,
    recover_on_startup,
)
from outbound_heartbeat.lease_async import AsyncLease
from outbound_heartbeat.lease_state import LeaseView

__all__ = [
    "Dial",
    "ProviderDial",
    "Slots",
    "connect_options",
    "fake_dial",
    "hang_up_status",
    "main",
    "parse",
    "parser",
    "run",
    "run_async",
    "run_sync",
    "say",
    "say_claimed",
]

#: A dialer: ``dial(job, seconds, must_stop)``, True when it hung up because the lease said stop.
Dial: TypeAlias = Callable[[Any, float, Callable[[], bool]], bool]


def say(step: str, **data: Any) -> None:
    print(json.dumps({"step": step, "t": time.monotonic(), **data}), flush=True)


def say_claimed(lease: LeaseView) -> None:
    say(
        "claimed",
        run_id=lease.run_id,
        epoch=lease.lease_epoch,
        resumed=lease.resumed,
        worker_id=lease.claim.worker_id,
        interval=lease.interval,
        pid=os.getpid(),
    )


def fake_dial(job: Any, seconds: float, must_stop: Callable[[], bool]) -> bool:
    """Stands in for the telephony call; True when it hung up because the lease said stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if must_stop():
            return True
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return False


class ProviderDial:
    """A :data:`Dial` through the fake provider: places the call under ``job.call_key`` with a
    callback URL carrying the key, rings for ``seconds`` (the callee answers and hangs up:
    ``completed``), then has the provider POST its status callback to the app. True when it
    hung up because the lease said stop, or the provider refused a voided key."""

    def __init__(self, path: str, callback_url: str | None, business_id: int) -> None:
        from .fake_provider import FakeProvider

        self.provider = FakeProvider(path)
        self.callback_url = callback_url
        self.business_id = business_id

    def url(self, call_key: str) -> str | None:
        """``--callback-url`` with ``{call_key}`` (and ``{business_id}``) filled in, or a base
        to which ``/calls/<key>/status`` is appended."""
        if self.callback_url is None:
            return None
        if "{call_key}" in self.callback_url:
            return self.callback_url.format(call_key=call_key, business_id=self.business_id)
        return f"{self.callback_url.rstrip('/')}/calls/{call_key}/status"

    def __call__(self, job: Any, seconds: float, must_stop: Callable[[], bool]) -> bool:
        from .fake_provider import KeyVoided

        key = job.call_key
        payload = job.payload if isinstance(job.payload, dict) else {}
        to = str(payload.get("to") or f"job-{job.id}")
        try:
            call = self.provider.dial(key, to, callback_url=self.url(key))
        except KeyVoided:
            # Reconciliation declared this key never placed (its job may be requeued under a
            # new key): nothing rang, and nothing will under this key.
            say("key_voided", job_id=job.id, call_key=key)
            return True
        say("placed", job_id=job.id, call_key=key, to=to, dial_attempts=call.dial_attempts,
            pid=os.getpid())
        if fake_dial(job, seconds, must_stop):
            self.provider.finish(key, "failed")
            return True
        self.provider.finish(key, "completed")
        say("call_ended", job_id=job.id, call_key=key, outcome="completed")
        if self.callback_url is not None:
            status = self.provider.send_callback(key)
            say("callback", job_id=job.id, call_key=key, http_status=status)
        return False


def dialer(args: argparse.Namespace, lease: LeaseView, dial: Dial) -> Dial:
    """The dialer of this run: the fake provider's with ``--provider``, else ``dial``."""
    if getattr(args, "provider", None):
        return ProviderDial(args.provider, args.callback_url, lease.business_id)
    return dial


def hang_up_status(lease: LeaseView, job: Any) -> tuple[str, str]:
    say("hung_up", job_id=job.id, suspended=lease.suspended, lost=lease.lost)
    return "failed", "hung up: the lease was suspended or lost"


class Slots:
    """One Redis call slot per dial when ``--redis-url`` is given (contrib.redis_slots)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.slots = None
        if args.redis_url:
            from .contrib.redis_slots import RedisSlots

            self.slots = RedisSlots.from_url(args.redis_url, args.slot_limit,
                                             prefix=args.slot_prefix)

    def take(self, business_id: int, run_id: int) -> str | None:
        if self.slots is None:
            return None
        deadline = time.monotonic() + 60
        while (token := self.slots.acquire(business_id, run_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no call slot for business {business_id} in 60 s")
            time.sleep(0.2)
        say("slot", token=token)
        return token

    def give_back(self, business_id: int, token: str | None) -> None:
        if self.slots is not None and token is not None:
            self.slots.release(business_id, token)


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"prepare_threshold": None} if args.no_prepare else {}


def run_sync(args: argparse.Namespace, dial: Dial = fake_dial) -> int:
    if args.recover:
        import psycopg

        with psycopg.connect(args.dsn, autocommit=True, **connect_options(args)) as conn:
            say("recovered", runs=[r.run_id for r in recover_on_startup(conn, args.worker_id)])
    try:
        with Lease(
            args.dsn,
            args.worker_id,
            args.run_id,
            interval=args.interval,
            stall_after=args.stall_after,
            connect_options=connect_options(args),
        ) as lease:
            say_claimed(lease)
            slots = Slots(args)
            dial = dialer(args, lease, dial)
            while (job := lease.next_job()) is not None:
                say("next_job", job_id=job.id, call_key=job.call_key)
                token = slots.take(lease.business_id, lease.run_id)
                say("dialing", job_id=job.id)
                stopped = dial(job, args.dial_seconds, lambda: lease.must_stop)
                slots.give_back(lease.business_id, token)
                if stopped:
                    # Waits for the database's next answer: resumed, or LeaseLost.
                    lease.finish_job(job, *hang_up_status(lease, job))
                    continue
                lease.finish_job(job, "completed")
                say("finish_job", job_id=job.id, status="completed")
                say("dialed", job_id=job.id)
            say("releasing", cancel_requested=lease.cancel_requested)
        say("released", lost=lease.lost)
        return 3 if lease.lost else 0
    except NothingToClaim:
        say("nothing_to_claim")
        return 2
    except LeaseLost as exc:
        say("lost", reason=str(exc))
        return 3


async def run_async(args: argparse.Namespace, dial: Dial = fake_dial) -> int:
    try:
        async with AsyncLease(
            args.dsn,
            args.worker_id,
            args.run_id,
            interval=args.interval,
            stall_after=args.stall_after,
            connect_options=connect_options(args),
        ) as lease:
            say_claimed(lease)
            slots = Slots(args)
            dial = dialer(args, lease, dial)
            while (job := await lease.next_job()) is not None:
                say("next_job", job_id=job.id, call_key=job.call_key)
                token = await asyncio.to_thread(slots.take, lease.business_id, lease.run_id)
                say("dialing", job_id=job.id)
                # A real async dialer awaits; the fake one sleeps in a thread.
                stopped = await asyncio.to_thread(
                    dial, job, args.dial_seconds, lambda: lease.must_stop
                )
                await asyncio.to_thread(slots.give_back, lease.business_id, token)
                if stopped:
                    await lease.finish_job(job, *hang_up_status(lease, job))
                    continue
                await lease.finish_job(job, "completed")
                say("finish_job", job_id=job.id, status="completed")
                say("dialed", job_id=job.id)
            say("releasing", cancel_requested=lease.cancel_requested)
        say("released", lost=lease.lost)
        return 3 if lease.lost else 0
    except NothingToClaim:
        say("nothing_to_claim")
        return 2
    except LeaseLost as exc:
        say("lost", reason=str(exc))
        return 3


def parser() -> argparse.ArgumentParser:
    """The worker's command line."""
    parser = argparse.ArgumentParser(description="A complete worker with a fake dialer.")
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"), required=False)
    parser.add_argument(
        "--worker-id",
        default=default_worker_id(),
        help="the worker's name (default: unique to this process, host + pid + random)",
    )
    parser.add_argument("--run-id", type=int)
    parser.add_argument("--interval", type=float)
    parser.add_argument("--stall-after", type=float, default=120.0)
    parser.add_argument("--dial-seconds", type=float, default=0.2)
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument(
        "--recover",
        action="store_true",
        help="stop this worker id's leftover runs instead of resuming them",
    )
    parser.add_argument(
        "--no-prepare",
        action="store_true",
        help="no server-side prepared statements (PgBouncer in transaction mode)",
    )
    parser.add_argument("--redis-url", help="take a Redis call slot per dial (extra redis)")
    parser.add_argument("--slot-limit", type=int, default=3, help="slots per business")
    parser.add_argument("--slot-prefix", default="outbound_heartbeat:slots")
    parser.add_argument(
        "--provider",
        metavar="PATH",
        help="dial through the fake provider whose calls are this SQLite file"
        " (outbound_heartbeat.fake_provider), each call under its job's call key",
    )
    parser.add_argument(
        "--callback-url",
        help="where the provider POSTs its status callback: a base (the adapters' prefix, e.g."
        " http://127.0.0.1:5000/api/outbound_calls; /calls/<key>/status is appended) or a"
        " template with {call_key} and {business_id}",
    )
    return parser


def parse(arguments: argparse.ArgumentParser) -> argparse.Namespace:
    """The command line parsed by ``arguments`` (:func:`parser`, maybe extended)."""
    args = arguments.parse_args()
    if not args.dsn:
        arguments.error("give --dsn or set DATABASE_URL")
    if args.callback_url and not args.provider:
        arguments.error("--callback-url needs --provider")
    if args.callback_url and "{call_key}" in args.callback_url:
        try:  # refused now, not at the first dial, after next_job() took a job
            args.callback_url.format(call_key="k", business_id=1)
        except (KeyError, IndexError, ValueError) as exc:
            arguments.error(f"argument --callback-url: a template fills in {{call_key}} and"
                            f" {{business_id}} only ({type(exc).__name__}: {exc})")
    return args


def run(args: argparse.Namespace, dial: Dial = fake_dial) -> int:
    """Runs the worker (sync or async, per ``--mode``) with ``dial`` as its dialer."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    return run_sync(args, dial) if args.mode == "sync" else asyncio.run(run_async(args, dial))


def main() -> int:
    return run(parse(parser()))


if __name__ == "__main__":
    sys.exit(main())
