"""Launcher of esamp.eval.sandbox (run as a script: ``python -I -S _sandbox_child.py MEM CPU FILE TMPFS WORK PY``).

Runs as a fresh single-threaded process; applies the isolation, then execs ``PY -I -S -`` which reads the
untrusted program from stdin.  Standard library only (it runs with -I -S)."""
import ctypes
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
NOBODY = 65534


def _fail(msg: str) -> None:
    sys.stderr.write(f"esamp sandbox: {msg}\n")
    sys.stderr.flush()
    os._exit(125)


def main() -> None:
    mem_mb, cpu_s, file_mb, tmpfs_mb = (int(v) for v in sys.argv[1:5])
    work, python = sys.argv[5], sys.argv[6]
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        # resolved before the tmpfs mounts below hide /tmp: a venv under /tmp (a CI clone) links to its base
        # interpreter, and that link is unreadable once /tmp is the sandbox's own empty tmpfs
        real = os.path.realpath(python)
        prefix = os.path.realpath(sys.base_prefix)
        if not real.startswith(prefix + os.sep):
            _fail(f"interpreter {real} is not inside its installation prefix {prefix}")
        if any(prefix == t or prefix.startswith(t + os.sep) for t in ("/tmp", "/var/tmp", "/dev/shm")):
            _fail(f"the interpreter's installation {prefix} lies under a directory the sandbox replaces by an "
                  f"empty tmpfs; use a Python installed elsewhere")
        if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
            _fail(f"unshare failed (errno {ctypes.get_errno()})")
        if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            _fail(f"making / private failed (errno {ctypes.get_errno()})")
        opts = f"size={tmpfs_mb}m,mode=1777".encode()
        for target in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(target):
                if libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
                    _fail(f"mounting a tmpfs on {target} failed (errno {ctypes.get_errno()})")
        # The interpreter may live under a directory user nobody cannot enter (/root/.pyenv/...): bind its
        # installation read-only into the private /tmp and run it from there.
        os.mkdir("/tmp/.python", 0o755)
        if libc.mount(prefix.encode(), b"/tmp/.python", None, MS_BIND | MS_REC, None) != 0:
            _fail(f"binding {prefix} failed (errno {ctypes.get_errno()})")
        if libc.mount(None, b"/tmp/.python", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID, None) != 0:
            _fail(f"remounting {prefix} read-only failed (errno {ctypes.get_errno()})")
        python = "/tmp/.python" + real[len(prefix):]
        os.environ["LD_LIBRARY_PATH"] = "/tmp/.python/lib"
        work = "/tmp/work"
        os.mkdir(work, 0o700)
        os.chown(work, NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    os.chdir(work)
    os.environ["HOME"] = work
    lim = [(resource.RLIMIT_AS, mem_mb << 20), (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_FSIZE, file_mb << 20),
           (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)]
    for which, value in lim:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as e:
            _fail(f"setrlimit({which}) failed: {e}")
    os.execv(python, [python, "-I", "-S", "-"])


if __name__ == "__main__":
    main()
