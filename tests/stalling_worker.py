"""The example worker with one knob only the tests need: ``--hang-on-job N`` makes its dial loop
hang forever on job N (it listens to nothing), as a stuck telephony call would.

Run as a script (``python tests/stalling_worker.py --dsn ... --hang-on-job 1``); takes every
option of ``python -m outbound_heartbeat.example_worker``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from outbound_heartbeat import example_worker


def main() -> int:
    arguments = example_worker.parser()
    arguments.add_argument("--hang-on-job", type=int, default=0, help="hang forever on job N")
    args = example_worker.parse(arguments)
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
