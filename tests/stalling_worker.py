"""The example worker with two knobs only the tests need: ``--hang-on-job N`` makes its dial loop
hang forever on job N (it listens to nothing), as a stuck telephony call would; ``--pause-at
STEP`` (repeatable) makes the process SIGSTOP itself, every thread at once, right after it
prints STEP's line the first time (a kill point: the test then SIGKILLs it, or SIGCONTs it).

Run as a script (``python tests/stalling_worker.py --dsn ... --hang-on-job 1``); takes every
option of ``python -m outbound_heartbeat.example_worker``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from outbound_heartbeat import example_worker


def main() -> int:
    arguments = example_worker.parser()
    arguments.add_argument("--hang-on-job", type=int, default=0, help="hang forever on job N")
    arguments.add_argument(
        "--pause-at", action="append", default=[], help="SIGSTOP itself after this step's line"
    )
    args = example_worker.parse(arguments)
    pause_at = set(args.pause_at)
    say = example_worker.say

    def say_and_pause(step: str, **data: Any) -> None:
        say(step, **data)
        if step in pause_at:
            pause_at.discard(step)
            os.kill(os.getpid(), signal.SIGSTOP)

    example_worker.say = say_and_pause  # type: ignore[assignment]
    dialed = 0

    def dial(job: Any, seconds: float, must_stop: Callable[[], bool]) -> bool:
        nonlocal dialed
        dialed += 1
        while dialed == args.hang_on_job:
            time.sleep(1)
        return example_worker.fake_dial(job, seconds, must_stop)

    return example_worker.run(args, dial)


if __name__ == "__main__":
    sys.exit(main())
