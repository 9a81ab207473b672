"""What a trial shows on a terminal while it runs: its phases, one bar each, counting the requests
of the phase (read through a pseudo-terminal, as a user's terminal shows it)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.conftest import cli_env

pytestmark = pytest.mark.slow


def _terminal_output(args: list[str], cwd: Path) -> str:
    main, child = pty.openpty()
    # A terminal 200 columns wide (a bare pseudo-terminal has no size, and tqdm then draws nothing).
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = {**cli_env(), "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env, stdout=child, stderr=child
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=600) == 0
    os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_the_bar_moves_through_loading_warm_up_calibration_and_measuring(tmp_path, store):
    args = ["-m", "max_new_tokens=4,6", "batch_size=2", "warmup_batches=3", "dataset.limit=6"]
    screen = _terminal_output([*args, *store["args"]], tmp_path)
    # The sweep's place and each phase in the bar's description.
    assert "trial 1/2" in screen and "trial 2/2 · sweep ETA" in screen
    for phase in ("loading", "warm-up", "calibration", "measuring"):
        assert f"· {phase}" in screen, phase
    # The warm-up's own count moves (6 requests: 3 batches of 2), before the measured run's.
    counts = [int(n) for n in re.findall(r"warm-up:\s+\d+%\|[^|]*\|\s+(\d)/6", screen)]
    assert counts and counts[-1] == 6 and len(set(counts)) >= 2, counts
    assert re.search(r"measuring:\s+100%\|[^|]*\|\s+6/6", screen)
    assert "Warning" not in screen  # library warnings go to the log file
