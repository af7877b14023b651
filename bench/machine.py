"""The machine the end-to-end benchmarks run on: CPUs, processes, versions.

Linux only where it reads ``/proc`` (CPU time, RSS, descriptors, per-CPU busy time).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_CPU = 0  # the servers under test and FakeLLM
LOAD_CPU = 1  # the load generator (and the orchestrator)


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def loop_settings() -> tuple[str, str]:
    """uvicorn's ``loop`` and ``http``: uvloop + httptools when installed, for every target."""
    return (
        "uvloop" if have("uvloop") else "asyncio",
        "httptools" if have("httptools") else "h11",
    )


def pin(cpu: int | None, nice: int = 0) -> None:
    """Bind this process to ``cpu``; with ``nice`` > 0, raise its priority by that much."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -nice)
        except OSError as exc:  # not root
            print(f"bench: cannot raise the priority ({exc})", file=sys.stderr)


def die_with_parent() -> None:
    """Children get SIGTERM if the benchmark process dies without cleaning up (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent is already gone
        raise SystemExit(0)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_busy() -> dict[int, float]:
    """Busy seconds of each CPU since boot (``/proc/stat``): all but idle and iowait; steal
    (time the hypervisor gave to someone else) counts as busy, it is lost to us too."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / tick
    return out


def wait_quiet(limit: float, threshold: float = 0.15, verbose: bool = False) -> bool:
    """Wait (up to ``limit`` seconds) until the machine's CPUs are idle enough to measure:
    busy less than ``threshold`` of one CPU in total over half a second."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        before = sum(cpu_busy().values())
        time.sleep(0.5)
        if sum(cpu_busy().values()) - before < threshold * 0.5:
            return True
        if time.monotonic() > deadline:
            if verbose:
                print("  (the machine is still busy: measuring anyway)", flush=True)
            return False
        if verbose and not said:
            print("  (waiting for other processes to leave the CPUs)", flush=True)
            said = True


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads), from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of a process (``VmRSS``), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def redis_pid(port: int = 6379) -> int | None:
    """The local ``redis-server`` listening on ``port``, when this machine runs one."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
            if f":{port}" in (entry / "cmdline").read_bytes().decode(errors="replace"):
                return int(entry.name)
        except OSError:
            continue
    return None


def can_pin() -> bool:
    return hasattr(os, "sched_getaffinity") and {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except (ImportError, AttributeError):
        return "?"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--", "src", "bench"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' + changes in src/ or bench/ not committed' if dirty else ''}"


def machine_line() -> str:
    loop, http = loop_settings()
    virt = ""
    with contextlib.suppress(OSError):
        if " hypervisor" in Path("/proc/cpuinfo").read_text():
            virt = ", virtualized"
    return (
        f"{cpu_model()}, nproc {os.cpu_count()}{virt}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvicorn {_version('uvicorn')} "
        f"(loop={loop}, http={http}), aiohttp {_version('aiohttp')}, httpx {_version('httpx')}, "
        f"starlette {_version('starlette')}, relaymw {_version('relaymw')} "
        f"({_relaymw_source()})"
    )


def _relaymw_source() -> str:
    """The checkout's git revision, or where relaymw was imported from when not from it, and
    which build it is."""
    try:
        import relaymw.engine  # the first module the mypyc build compiles
    except ImportError:
        return "not installed"
    build = "pure Python" if relaymw.engine.__file__.endswith(".py") else "core compiled with mypyc"
    where = Path(relaymw.__file__).resolve().parent
    if where == HERE.parent / "src" / "relaymw":
        return f"git {_git_revision()}, {build}"
    return f"imported from {where}, {build}"


def load_average() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
