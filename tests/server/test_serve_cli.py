"""`lingkar serve` as an operator starts it: what it prints about the organizer key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from testkit.ports import free_port
from tests.live import SECRET

REPO = Path(__file__).resolve().parents[2]
KEY = "operator-chosen-key-0123456789abcdef"
STOPPED = (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down cleanly


def _serve(env_extra: dict[str, str]) -> tuple[int, str]:
    """Start `lingkar serve`, read its output up to uvicorn's line saying it listens (or its
    exit), stop it with SIGTERM; its exit code and everything it wrote, stdout and stderr."""
    env = {**os.environ, "LINGKAR_PORT": str(free_port()), "LINGKAR_HOST": "127.0.0.1",
           "LINGKAR_SECRET": SECRET, **env_extra}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out: list[str] = []
    for line in proc.stdout:  # blocks on the process's own output: an event, not a poll
        out.append(line)
        if "Uvicorn running on" in line:
            proc.send_signal(signal.SIGTERM)
    out.append(proc.stdout.read())
    return proc.wait(timeout=30), "".join(out)


def test_a_configured_key_is_never_printed() -> None:
    code, out = _serve({"LINGKAR_API_KEY": KEY})
    assert code in STOPPED, out
    assert "Lingkar is running at" in out and "/organizer" in out
    assert KEY not in out and KEY[:12] not in out


def test_a_generated_key_is_shown_once_in_the_organizer_link() -> None:
    assert "LINGKAR_API_KEY" not in os.environ
    code, out = _serve({})
    assert code in STOPPED, out
    (link,) = [line for line in out.splitlines() if "/organizer#key=" in line]
    key = link.split("#key=", 1)[1].strip()
    assert len(key) >= 24 and out.count(key) == 1


def test_a_short_key_stops_the_start_with_one_line() -> None:
    code, out = _serve({"LINGKAR_API_KEY": "pendek-sekali"})
    assert code == 2
    assert out.strip().count("\n") == 0 and "LINGKAR_API_KEY" in out and "24" in out
    assert "pendek-sekali" not in out and "Traceback" not in out
