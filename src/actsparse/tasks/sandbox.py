"""Run untrusted generated Python (code tasks' tests) in a subprocess with limits, and leave nothing.

Each program runs in a fresh temporary folder (its working directory and HOME, removed afterwards),
as `python -I` in its own session, with resource limits: address space, CPU time, file size, no
child processes (for a non-root user), and a wall-clock timeout after which the whole process group
is killed. The network is cut twice: in a new, empty network namespace where the kernel allows
an unprivileged one, and in any case by a prelude that makes `socket` unusable (as human-eval's
reliability guard does). This is a guard against accidents of generated code (loops, runaway
memory, stray files), not a security boundary against an adversary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 10.0
"""Seconds of wall-clock time a test program may run."""

MEMORY = 1 << 30
"""Bytes of address space a test program may map (1 GiB)."""

FILE_SIZE = 16 << 20
"""Bytes a test program may write to one file."""

OUTPUT = 1 << 16
"""Bytes of stdout and stderr kept from a test program."""

PRELUDE = """\
import socket as _s
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the actsparse sandbox")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(_s, _name, _no_network)
import _socket
_socket.socket = _no_network
del _s, _socket, _name
"""
"""Prepended to every program: no socket can be made, even where no network namespace could be."""


@dataclass(frozen=True)
class Outcome:
    """How a program ended: `passed` only for exit status 0 within the time limit."""

    passed: bool
    returncode: int | None  # None when it was killed at the timeout
    timed_out: bool
    seconds: float
    output: str  # the start of stdout and stderr together


LAUNCHER = """\
import ctypes, os, resource, sys
memory, cpu, fsize, program = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no fork for a non-root user; root: the group kill
try:
    ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000)  # new user + empty network namespace
except (OSError, AttributeError):
    pass
os.execv(sys.executable, [sys.executable, "-I", "-B", program])
"""
"""Runs first in the child: limits and namespace, then exec of the program (no preexec_fn in a
threaded parent)."""


def run_program(source: str, timeout: float = TIMEOUT, memory: int = MEMORY) -> Outcome:
    """Run `source` as a Python program in the sandbox; never raises for the program's own failures."""
    if timeout <= 0 or memory <= 0:
        raise ValueError("the sandbox needs a positive timeout and memory limit")
    with tempfile.TemporaryDirectory(prefix="actsparse-sandbox-") as folder:
        path = Path(folder) / "program.py"
        path.write_text(PRELUDE + source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        args = [str(memory), str(int(timeout) + 1), str(FILE_SIZE), str(path)]
        log = Path(folder) / "output.txt"
        start = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", LAUNCHER, *args],
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as a whole
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # the program at its timeout, and anything left in its group
                proc.wait()
        seconds = time.monotonic() - start
        with log.open("rb") as f:
            text = f.read(OUTPUT).decode("utf-8", "replace")
    code = None if timed_out else proc.returncode
    return Outcome(code == 0, code, timed_out, seconds, text)


def _kill_group(pid: int, wait: float = 5.0) -> None:
    """SIGKILL the process group `pid` and wait (at most `wait` seconds) until each member has died.

    A SIGKILL is delivered asynchronously: a forked grandchild can still be running for a moment
    after killpg returns. Members that are only zombies (dead, not yet reaped) count as gone.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while _live_members(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _live_members(group: int) -> bool:
    """Whether any process of process group `group`, other than a zombie, is still alive."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended while we looked
            continue
        fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if len(fields) > 2 and int(fields[2]) == group and fields[0] not in "ZX":
            return True
    return False


def passes(source: str, timeout: float = TIMEOUT, memory: int = MEMORY) -> bool:
    """Whether `source` (a solution and its tests) runs to a clean exit within the limits."""
    return run_program(source, timeout, memory).passed
