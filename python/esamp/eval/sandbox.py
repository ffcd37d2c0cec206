"""Running untrusted, model-written programs (HumanEval completions) outside the evaluating process.

Every program runs in its own child process, never in ours:

    python -I -S -   (isolated mode, no site-packages; the program arrives on stdin)

started through a small launcher (``_sandbox_child.py``, our own code, run as a fresh process so that nothing
happens between fork and exec in our multi-threaded process) which, before it execs the interpreter:

- when running as root: unshares a new network namespace (no interfaces but a downed loopback: no network) and a
  new mount namespace in which /tmp, /var/tmp and /dev/shm are fresh size-limited tmpfs mounts (a program that
  fills the disk gets ENOSPC in its own 64 MiB tmpfs), then drops to user ``nobody`` (no write access elsewhere);
- always: rlimits on address space (memory), CPU seconds, file size, core dumps and processes (RLIMIT_NPROC = 0:
  ``fork``/``subprocess``/threads fail), its own session (so the whole process group is killed on timeout),
  an empty environment (PATH, HOME=the work dir, LANG, PYTHONHASHSEED=0).

The parent enforces a wall-clock timeout (killing the process group) and caps the captured output.  A program that
hangs, crashes, forks, allocates without bound or fills its disk fails; the evaluation goes on.

Without root the namespaces and the user switch are not available: the rlimits, the timeout, isolated mode and the
temporary working directory still apply, and :func:`isolation` says which guards are active (the evaluation
records it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["RunResult", "run_program", "isolation", "DEFAULT_LIMITS"]

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
DEFAULT_LIMITS = {"timeout_s": 10.0, "memory_mb": 1024, "cpu_s": 10, "file_mb": 16, "tmpfs_mb": 64}
_MAX_OUTPUT = 1 << 14


@dataclass
class RunResult:
    status: str            # "passed" (exit 0), "failed" (exit != 0), "timeout", "killed" (signal), "error"
    returncode: Optional[int]
    wall_s: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def isolation() -> Dict[str, bool]:
    """Which guards run_program applies on this machine."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return {"subprocess": True, "isolated_python": True, "rlimits": True, "timeout": True,
            "network_namespace": root, "private_tmpfs": root, "user_nobody": root}


def _tail(b: bytes) -> str:
    return b[-_MAX_OUTPUT:].decode("utf-8", "replace")


def run_program(code: str, *, timeout_s: float = DEFAULT_LIMITS["timeout_s"],
                memory_mb: int = DEFAULT_LIMITS["memory_mb"], cpu_s: int = DEFAULT_LIMITS["cpu_s"],
                file_mb: int = DEFAULT_LIMITS["file_mb"], tmpfs_mb: int = DEFAULT_LIMITS["tmpfs_mb"],
                python: Optional[str] = None) -> RunResult:
    """Run `code` (Python source) in a sandboxed child process; status "passed" when it exits with 0."""
    if not isinstance(code, str):
        raise TypeError(f"code: expected a str, got {type(code).__name__}")
    for name, v in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("cpu_s", cpu_s), ("file_mb", file_mb),
                    ("tmpfs_mb", tmpfs_mb)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    python = python or sys.executable
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="esamp-sbx-") as work:
        os.chmod(work, 0o777)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        args = [python, "-I", "-S", _CHILD, str(int(memory_mb)), str(int(cpu_s)), str(int(file_mb)),
                str(int(tmpfs_mb)), work, python]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=work, env=env, start_new_session=True, close_fds=True)
        except OSError as e:
            return RunResult("error", None, time.perf_counter() - t0, "", f"could not start the sandbox: {e}")
        try:
            out, err = proc.communicate(code.encode("utf-8", "replace"), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
            return RunResult("timeout", None, time.perf_counter() - t0, _tail(out), _tail(err))
        finally:
            if proc.poll() is None:
                _kill(proc)
        _kill_group(proc.pid)           # anything the program left behind in its session
    rc = proc.returncode
    wall = time.perf_counter() - t0
    if rc == 0:
        return RunResult("passed", rc, wall, _tail(out), _tail(err))
    if rc is not None and rc < 0:
        return RunResult("killed", rc, wall, _tail(out), _tail(err))
    return RunResult("failed", rc, wall, _tail(out), _tail(err))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    _kill_group(proc.pid)
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass
