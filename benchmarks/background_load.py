"""Loads the machine the way neighbours' test suites do, to measure a stage under load:
6 processes spinning on the CPUs and 2 writing 64 KiB blocks with O_DSYNC to a temporary
directory, for SECONDS. Run it beside a benchmark; it cleans up after itself.

    python -m benchmarks.background_load 170 & python -m benchmarks.run --full --only many_leases
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time

SPINNERS = 6
WRITERS = 2
BLOCK = b"\0" * 65536


def _spin(until: float) -> None:
    while time.monotonic() < until:
        pass


def _write(until: float, directory: str, n: int) -> None:
    path = os.path.join(directory, f"load-{n}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
    try:
        while time.monotonic() < until:
            os.lseek(fd, 0, os.SEEK_SET)
            for _ in range(256):  # 16 MiB, then over again
                os.write(fd, BLOCK)
    finally:
        os.close(fd)
        os.unlink(path)


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 170.0
    until = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix="oh-load-") as directory:
        procs = [multiprocessing.Process(target=_spin, args=(until,)) for _ in range(SPINNERS)]
        procs += [multiprocessing.Process(target=_write, args=(until, directory, n))
                  for n in range(WRITERS)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
