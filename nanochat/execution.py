"""
Run untrusted (model-written) Python code and report what happened. Used by HumanEval to check programs.

Each call runs the code in a brand-new interpreter (`python -I -c ...`), never a fork of this process, so:
- the child sees a scrubbed environment (no API keys or tokens of the parent), a fresh temp working dir that is
  deleted afterwards, and /dev/null as stdin;
- limits are set inside the child with resource.setrlimit (address space, data, stack, file size, CPU seconds,
  processes) and a wall-clock timeout is enforced by the parent, which kills the child's whole process group;
- no signals are installed in the parent, so execute_code works from any thread.
Inside the child a small guard prelude disables destructive functions (kill, fork, exec, remove, chmod, ...),
blocks a few modules, refuses writes outside the temp dir and reads of other processes' /proc entries.
When the parent runs as root (containers), the child additionally drops to the unprivileged `nobody` user, which
makes the file-permission and process-count limits real kernel limits.

This is defence in depth for evaluating benchmark solutions, not a security boundary against a determined attacker
(network access remains possible, for one).
"""

import os
import sys
import shutil
import signal
import platform
import tempfile
import threading
import subprocess
from dataclasses import dataclass, fields

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024    # RLIMIT_FSIZE: caps every file the child writes, stdout/stderr included
MAX_CAPTURE_CHARS = 1_000_000       # how much of stdout/stderr we hand back
MAX_CHILD_PROCESSES = 8             # RLIMIT_NPROC, enforced by the kernel for non-root users
NOBODY_UID = 65534


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        # only what differs from the defaults, so a failed result reads at a glance
        parts = [f"success={self.success}"]
        for f in fields(self)[1:]:
            value = getattr(self, f.name)
            if f.name in ("stdout", "stderr"):
                if value:
                    parts.append(f"{f.name}={value!r}")
            elif value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"ExecutionResult({', '.join(parts)})"


# -----------------------------------------------------------------------------
# The prelude that runs in the child before the user's code. Everything lives inside one function that is deleted
# afterwards, and the user code gets fresh globals, so none of these names are visible to it.

_GUARD_PRELUDE = r'''
def _nanochat_guard(memory_bytes, file_bytes, cpu_seconds, max_procs):
    import os, sys, io, builtins, platform, faulthandler
    import resource, shutil, subprocess, threading  # import before disabling what they need at import time
    is_mac = platform.uname().system == "Darwin"
    if memory_bytes is not None and not is_mac:
        for limit in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            resource.setrlimit(limit, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if hasattr(resource, "RLIMIT_NPROC"):
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
    faulthandler.disable()

    # --- writes only inside the working dir; no peeking at other processes through /proc
    workdir = os.path.realpath(os.getcwd())
    my_proc = "/proc/%d" % os.getpid()
    realpath, join, isabs, fspath = os.path.realpath, os.path.join, os.path.isabs, os.fspath
    def resolve(path):
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        return realpath(path if isabs(path) else join(workdir, path))
    def check(path, writing):
        if isinstance(path, int):
            return  # an already-open descriptor
        p = resolve(path)
        if writing and p != "/dev/null" and p != workdir and not p.startswith(workdir + os.sep):
            raise PermissionError("sandbox: writing outside the working directory is not allowed: %r" % (path,))
        if p.startswith("/proc/") and p.split("/")[2].isdigit() and not (p == my_proc or p.startswith(my_proc + "/")):
            raise PermissionError("sandbox: access to other processes is not allowed: %r" % (path,))
    real_open, real_os_open, real_fileio = builtins.open, os.open, io.FileIO
    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, *args, **kwargs)
    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, any(c in mode for c in "wax+"))
            super().__init__(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open
    io.FileIO = GuardedFileIO
    import _io
    _io.open, _io.FileIO = guarded_open, GuardedFileIO
    def path_guard(fn):
        def wrapper(path, *args, **kwargs):
            check(path, True)
            return fn(path, *args, **kwargs)
        return wrapper
    import posix
    for name in ("mkdir", "makedirs", "symlink", "link", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            setattr(os, name, path_guard(getattr(os, name)))
    posix.open = os.open = guarded_os_open

    # --- destructive or escaping functions: gone (os and its C twin posix both)
    os.environ["OMP_NUM_THREADS"] = "1"
    disabled = ("kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir",
                "fchdir", "chdir", "getcwd", "setuid", "seteuid", "setgid", "setegid", "setreuid", "setregid",
                "setresuid", "setresgid", "setsid", "setpgid", "fork", "forkpty", "vfork", "rename", "renames",
                "replace", "truncate", "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags",
                "lchmod", "lchown", "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
                "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                "posix_spawn", "posix_spawnp", "register_at_fork", "pidfd_open", "plock", "nice")
    for module in (os, posix):
        for name in disabled:
            if hasattr(module, name):
                setattr(module, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.call = subprocess.run = subprocess.check_call = subprocess.check_output = None
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = None
    except ImportError:
        pass
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing",
                 "_multiprocessing", "pty"):
        sys.modules[name] = None
'''


def _build_program(code, maximum_memory_bytes, cpu_seconds):
    return (
        _GUARD_PRELUDE
        + f"\n_nanochat_guard({maximum_memory_bytes!r}, {MAX_FILE_BYTES!r}, {cpu_seconds!r}, {MAX_CHILD_PROCESSES!r})"
        + "\ndel _nanochat_guard"
        + f"\nexec(compile({code!r}, '<llm>', 'exec'), {{'__name__': '__main__'}})\n"
    )


# -----------------------------------------------------------------------------
# Dropping privileges when we are root: decided once per process by a probe (the venv may not be readable by nobody)

_drop_lock = threading.Lock()
_drop_decision = None


def _can_drop_to_nobody():
    global _drop_decision
    with _drop_lock:
        if _drop_decision is None:
            _drop_decision = False
            if hasattr(os, "geteuid") and os.geteuid() == 0 and platform.uname().system == "Linux":
                probe_dir = tempfile.mkdtemp(prefix="nanochat_exec_probe_")
                try:
                    os.chown(probe_dir, NOBODY_UID, NOBODY_UID)
                    probe = subprocess.run([sys.executable, "-I", "-c", "import resource, posix, io"],
                                           cwd=probe_dir, env=_child_env(probe_dir), stdin=subprocess.DEVNULL,
                                           capture_output=True, timeout=30, user=NOBODY_UID, group=NOBODY_UID,
                                           extra_groups=[])
                    _drop_decision = probe.returncode == 0
                except (OSError, subprocess.SubprocessError):
                    _drop_decision = False
                finally:
                    shutil.rmtree(probe_dir, ignore_errors=True)
        return _drop_decision


def _child_env(workdir):
    # nothing from the parent's environment: no tokens, keys or proxy settings leak into model-written code
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1"}


def _kill_group(proc):
    # the child leads its own session, so this also reaches anything it managed to spawn
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(path):
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTURE_CHARS + 1)
    text = data.decode("utf-8", errors="replace")
    if len(data) > MAX_CAPTURE_CHARS:
        text = text[:MAX_CAPTURE_CHARS] + "\n... [output truncated]"
    return text


def execute_code(code, timeout=DEFAULT_TIMEOUT, maximum_memory_bytes=DEFAULT_MEMORY_BYTES):
    """Run `code` in a sandboxed fresh interpreter. maximum_memory_bytes=None disables the memory limit."""
    assert isinstance(code, str), "code must be a string"
    cpu_seconds = int(timeout) + 2  # a backstop; the wall clock below is the real limit
    program = _build_program(code, maximum_memory_bytes, cpu_seconds)
    drop = _can_drop_to_nobody()
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        if drop:
            os.chmod(root, 0o711)  # nobody may pass through to its working dir, but not list our files
            os.chown(workdir, NOBODY_UID, NOBODY_UID)
        stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        extra = dict(user=NOBODY_UID, group=NOBODY_UID, extra_groups=[]) if drop else {}
        timed_out = False
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-X", "utf8", "-c", program], cwd=workdir,
                                    env=_child_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, **extra)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)  # always: leftovers of a finished run must not outlive it either
            proc.wait()
        stdout, stderr = _read_capped(stdout_path), _read_capped(stderr_path)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if timed_out:
        return ExecutionResult(success=False, stdout=stdout, stderr=stderr, timeout=True,
                               error="Execution timed out (process killed)")
    if proc.returncode == 0:
        return ExecutionResult(success=True, stdout=stdout, stderr=stderr)
    memory_exceeded = "MemoryError" in stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        error = lines[-1].strip()
    elif proc.returncode < 0:
        error = f"Execution failed (killed by {signal.Signals(-proc.returncode).name})"
    else:
        error = "Execution failed"
    if memory_exceeded and not error.startswith("Memory"):
        error = f"Memory limit exceeded: {error}"
    return ExecutionResult(success=False, stdout=stdout, stderr=stderr, error=error, memory_exceeded=memory_exceeded)
