"""What a bench or the load test reads of a process (from /proc, Linux), and stopping one."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of `pid` (its threads included) in seconds, from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (its threads included) in seconds, from /proc/<pid>/stat."""
    user, system = user_system_seconds(pid)
    return user + system


def _status(path: str, field: str) -> int:
    """The first number of `field` in a /proc status file (0 when it has none)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def sleeps(pid: int | None = None) -> int:
    """How often `pid`'s main thread (this thread when None) went to sleep: voluntary
    context switches, from /proc/<pid>/status."""
    return _status(f"/proc/{pid}/status" if pid else "/proc/thread-self/status", "voluntary_ctxt_switches")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle or iowait) since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def rss_bytes(pid: int | None = None) -> int:
    """VmRSS of `pid` (this process when None) in bytes, from /proc/<pid>/status."""
    return _status(f"/proc/{pid or 'self'}/status", "VmRSS") * 1024


def stop(proc: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; nothing when it already exited."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def cluster_leftovers(data: Path, process_url: str, pids: frozenset[int] = frozenset()) -> list[str]:
    """Processes still running that a `lingkar cluster` started ("pid: command"): the `pids` it
    wrote down, anything working in its data directory (Redis and Caddy do; Redis retitles
    itself, so its arguments no longer show), and any `lingkar serve` whose process URL is
    under `process_url` (the public URL + "/p/")."""
    mark = f"LINGKAR_PROCESS_URL={process_url}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if "State:\tZ" in (proc / "status").read_text():
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ours = (int(proc.name) in pids or Path(os.readlink(proc / "cwd")).is_relative_to(data)
                    or mark in (proc / "environ").read_bytes())
        except OSError:
            continue
        if ours:
            found.append(f"{proc.name}: {command[:120]}")
    return found
