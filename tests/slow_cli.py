"""The real `surgery` CLI, pausing after every tensor it writes so that tests can signal it mid-write.

    python -m tests.slow_cli SECONDS upcycle SRC DST ...
"""

from __future__ import annotations

import sys
import time

import surgery.writer
from surgery.cli import main


def run(delay: float, args: list[str]) -> None:
    write_tensor = surgery.writer._write_tensor

    def slow(*a, **k):
        write_tensor(*a, **k)
        time.sleep(delay)

    surgery.writer._write_tensor = slow
    main(args, prog_name="surgery")


if __name__ == "__main__":
    run(float(sys.argv[1]), sys.argv[2:])
