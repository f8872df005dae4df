"""
Run untrusted (model-written) Python code and report what happened. Used by HumanEval to grade programs.

Isolation, decided once per process, named in every result (`isolation`) and printed by chat_eval:
- "bwrap": bubblewrap runs the program in its own PID, mount, network and IPC namespaces: the whole filesystem
  read-only, a private /tmp and working dir, no network, uid 65534, no capabilities, and nothing it starts outlives
  the call (the PID namespace dies with the program's supervisor, and that with us: --die-with-parent). Not root, we
  get uid 65534 from a user namespace. As root we use none: uid 65534 of a user namespace made by root is root
  outside it, which the kernel's process limit does not apply to. The supervisor (root, keeping only the capabilities
  to drop privileges and to kill) drops the program to the real uid 65534 instead, and an interpreter under a home
  closed to others (0700 /root) is bound back into an empty /root, so nothing else of it is visible.
- "nobody": no bubblewrap, but we are root: the program drops to the unprivileged `nobody` user, so the kernel's file
  permissions and process limit apply. It can still read world-readable files and reach the network.
- "rlimits": no bubblewrap and no way to drop privileges (not root, or `nobody` cannot run this interpreter): the
  program runs as this user with only the limits below. A one-line warning says so, once.
In every mode the program gets a fresh interpreter (never a fork of this process), a scrubbed environment (no keys or
tokens of the parent), a temp working dir deleted afterwards, /dev/null as stdin, resource limits (address space,
file size, CPU seconds, processes) and a wall-clock timeout. A small supervisor process runs it and is the subreaper
of everything it starts (PR_SET_CHILD_SUBREAPER), so setsid + double fork does not escape: the supervisor kills and
reaps all of it before the call returns. In "rlimits" mode the program can kill its supervisor, as it is the same user.

success means the program ran to its last line: a sys.exit() or os._exit(), even with status 0, is not a pass.
"""

import os
import sys
import json
import contextlib
import shutil
import stat
import signal
import secrets
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
BWRAP = shutil.which("bwrap")


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    isolation: str = ""

    def __repr__(self):
        # only the fields that are set (every default is empty or false), so a failed result reads at a glance
        parts = [f"success={self.success}"]
        parts += [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)[1:] if getattr(self, f.name)]
        return f"ExecutionResult({', '.join(parts)})"


# -----------------------------------------------------------------------------
# The supervisor: reads a token line and the program from stdin, forks the program (limits set, privileges dropped),
# then kills and reaps everything that is left. The program gets fresh globals; only when it returns does the token
# go to the done pipe. Threat model: this tells a program that ran to its end from one that exited early (sys.exit,
# os._exit, a signal); it does not stop code that deliberately digs the token out of the supervisor's globals.

_SUPERVISOR = r'''
import os, sys, json, ctypes, signal, resource, contextlib
limits, drop_uid, done_fd = json.loads(sys.argv[1])
token = sys.stdin.readline().strip().encode()
code = sys.stdin.read()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
linux = sys.platform == "linux"
if linux:
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the program's processes become ours
pid = os.fork()
if pid == 0:
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if drop_uid is not None:
        os.setgroups([])
        os.setgid(drop_uid)
        os.setuid(drop_uid)
    exec(compile(code, "<llm>", "exec"), {"__name__": "__main__"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(done_fd, token)
    os._exit(0)
os.close(done_fd)
def kill(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
signal.signal(signal.SIGTERM, lambda *_: kill(pid))  # the caller's timeout
status = os.waitpid(pid, 0)[1]
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # its pid is free now and may be reused by another process
while linux:  # kill what is left; each kill may orphan more processes to us, so until we have no child at all
    with open("/proc/self/task/%d/children" % os.getpid()) as f:
        children = [int(c) for c in f.read().split()]
    for child in children:
        kill(child)
    try:
        os.waitpid(-1, 0 if children else os.WNOHANG)
    except ChildProcessError:
        break
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
'''


# -----------------------------------------------------------------------------
# Which isolation this machine allows: probed once per process

_isolation_lock = threading.Lock()
_isolation = None


def _bind_back(path, above):
    """bwrap args that recreate the directories between `above` and `path` open to uid 65534, then bind `path` back
    read-only (after `above` was hidden: a tmpfs over it)."""
    parts = path.split(os.sep)
    opened = [os.sep.join(parts[:i]) for i in range(above.count(os.sep) + 2, len(parts))]
    return [arg for d in opened for arg in ("--perms", "0755", "--dir", d)] + ["--ro-bind", path, path]


def _reveal(path):
    """bwrap args that let uid 65534 reach `path` when an ancestor is closed to others: an empty tmpfs over the
    topmost such ancestor, and `path` bound back."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for ancestor in (os.sep.join(parts[:i]) for i in range(2, len(parts))):
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ["--tmpfs", ancestor, *_bind_back(path, ancestor)]
    return []


def _rebind_under_tmp(paths):
    """The private /tmp hides an interpreter or venv that lives under /tmp (a CI clone, say): bind those back."""
    paths = sorted({os.path.realpath(p) for p in paths})
    return [arg for path in paths if path.startswith("/tmp/") for arg in _bind_back(path, "/tmp")]


def _bwrap_args(workdir):
    if os.geteuid() == 0:  # no user namespace; the supervisor drops the program to uid 65534 (see the module doc)
        isolate = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                   "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL",
                   "--ro-bind", "/", "/", *_reveal(sys.base_prefix)]
    else:
        isolate = ["--unshare-all", "--cap-drop", "ALL", "--uid", str(NOBODY_UID), "--gid", str(NOBODY_UID),
                   "--ro-bind", "/", "/"]
    # /tmp and the dirs bwrap makes for the working dir must be open to uid 65534 when it is not their owner
    return [BWRAP, "--die-with-parent", "--new-session", *isolate, "--proc", "/proc", "--dev", "/dev",
            "--perms", "01777", "--tmpfs", "/tmp", *_rebind_under_tmp([sys.prefix, sys.base_prefix]),
            "--perms", "0755", "--dir", os.path.dirname(workdir),
            "--bind", workdir, workdir, "--chdir", workdir]


def _probe(argv, workdir, drop_uid):
    """'' if `argv` imports a few stdlib modules fine (as `drop_uid`, if not None), else why not."""
    code = "import json, ctypes, random"
    if drop_uid is not None:
        code = f"import os; os.setgroups([]); os.setgid({drop_uid}); os.setuid({drop_uid}); {code}"
    try:
        probe = subprocess.run(argv + [sys.executable, "-I", "-c", code], cwd=workdir, env=_child_env(workdir),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return "" if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["failed"])[-1]


def _probe_isolation():
    """(mode, warning): the strongest isolation that works here."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    root = tempfile.mkdtemp(prefix="nanochat_exec_probe_")
    try:
        if as_root:
            os.chown(root, NOBODY_UID, NOBODY_UID)
            os.chmod(root, 0o711)  # bwrap's root, without CAP_DAC_OVERRIDE, must still enter it
        # each probe answers "" when the mode works, else why not; None = not even tried
        bwrap = _probe(_bwrap_args(root), root, NOBODY_UID if as_root else None) if BWRAP else None
        if bwrap == "":
            return "bwrap", None
        nobody = _probe([], root, NOBODY_UID) if as_root else None
        if nobody == "":
            return "nobody", None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bwrap_problem = "is not installed" if bwrap is None else f"does not work here ({bwrap})"
    drop_problem = ("we are not root, so cannot drop to an unprivileged user" if nobody is None
                    else f"user nobody cannot run {sys.executable} ({nobody})")
    return "rlimits", (f"warning: model-written code runs unsandboxed, as this user with only resource limits: "
                       f"bubblewrap {bwrap_problem} and {drop_problem}; apt-get install bubblewrap to isolate it")


def isolation():
    """The isolation execute_code uses in this process: "bwrap", "nobody" or "rlimits" (see the module doc)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation, warning = _probe_isolation()
            if warning:
                print(warning, file=sys.stderr)
        return _isolation


def _child_env(workdir):
    # nothing from the parent's environment: no tokens, keys or proxy settings leak into model-written code
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1"}


def _read_capped(path):
    with open(path, "rb") as f:
        data = f.read(MAX_CAPTURE_CHARS + 1)
    text = data.decode("utf-8", errors="replace")
    if len(data) > MAX_CAPTURE_CHARS:
        text = text[:MAX_CAPTURE_CHARS] + "\n... [output truncated]"
    return text


def _run(argv, workdir, root, code, timeout, done_w):
    """Run the supervisor; returns (returncode, timed_out, stdout, stderr)."""
    stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    timed_out = False
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=workdir, env=_child_env(workdir), stdin=subprocess.PIPE, stdout=out,
                                stderr=err, pass_fds=(done_w,), start_new_session=True)
        os.close(done_w)
        try:
            proc.communicate(code, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()  # the supervisor kills the program and everything it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # a backstop, should the supervisor itself have been killed
        proc.wait()
    return proc.returncode, timed_out, _read_capped(stdout_path), _read_capped(stderr_path)


def execute_code(code, timeout=DEFAULT_TIMEOUT, maximum_memory_bytes=DEFAULT_MEMORY_BYTES):
    """Run `code` in a sandboxed fresh interpreter. maximum_memory_bytes=None disables the memory limit."""
    mode = isolation()
    # CPU seconds are a backstop: the wall clock is the real limit
    limits = {"RLIMIT_FSIZE": MAX_FILE_BYTES, "RLIMIT_CPU": int(timeout) + 2, "RLIMIT_CORE": 0,
              "RLIMIT_NPROC": MAX_CHILD_PROCESSES}
    if maximum_memory_bytes is not None and platform.system() != "Darwin":  # macOS refuses these limits
        limits.update(RLIMIT_AS=maximum_memory_bytes, RLIMIT_DATA=maximum_memory_bytes,
                      RLIMIT_STACK=maximum_memory_bytes)
    token = secrets.token_hex(16)
    done_r, done_w = os.pipe()
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        drop_uid = NOBODY_UID if mode == "nobody" or (mode == "bwrap" and os.geteuid() == 0) else None
        if drop_uid is not None:
            os.chmod(root, 0o711)  # nobody may pass through to its working dir, but not list our files
            os.chown(workdir, NOBODY_UID, NOBODY_UID)
        argv = [sys.executable, "-I", "-X", "utf8", "-c", _SUPERVISOR, json.dumps([limits, drop_uid, done_w])]
        if mode == "bwrap":
            argv = _bwrap_args(workdir) + argv
        returncode, timed_out, stdout, stderr = _run(argv, workdir, root, f"{token}\n{code}".encode(), timeout,
                                                     done_w)
        os.set_blocking(done_r, False)
        try:
            finished = token.encode() in os.read(done_r, 4096)  # a forked copy of the program may add one
        except BlockingIOError:
            finished = False
    finally:
        os.close(done_r)
        shutil.rmtree(root, ignore_errors=True)

    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr, isolation=mode)
    if timed_out:
        result.timeout, result.error = True, "Execution timed out (process killed)"
    elif finished and returncode == 0:
        result.success = True
    else:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        if lines:
            result.error = lines[-1]
        elif returncode > 128:
            result.error = f"Execution failed (killed by {signal.Signals(returncode - 128).name})"
        elif returncode == 0:
            result.error = "Execution stopped before the end of the program (sys.exit or os._exit)"
        else:
            result.error = "Execution failed"
        result.memory_exceeded = "MemoryError" in stderr
        if result.memory_exceeded and not result.error.startswith("Memory"):
            result.error = f"Memory limit exceeded: {result.error}"
    return result
