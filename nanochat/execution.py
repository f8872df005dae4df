"""
Run untrusted (model-written) Python code and report what happened. Used by HumanEval to grade programs.

The program runs in a fresh interpreter (never a fork of this process) with a scrubbed environment (no keys or tokens
of the parent), /dev/null as stdin, resource limits (address space, file size, CPU seconds, processes, open files), a
seccomp filter (Linux on x86_64 and aarch64) that refuses memfd_create, memfd_secret and shmget (memory that the
address-space limit does not count), and a wall-clock timeout. A small supervisor process starts it and is the reaper of everything it starts, so
setsid + double fork does not escape: all of it is killed before the call returns.

What the program can see and reach, per isolation mode (decided once per process, named in every result's
`isolation`, printed by chat_eval):
- "bwrap" (bubblewrap installed and able to run this interpreter): its own PID, mount, network, IPC and UTS
  namespaces, uid 65534, no capabilities. The filesystem is an allow-list: /usr and the /bin, /lib* links, two files of
  /etc (the loader cache, the time zone), the interpreter's own prefixes (a venv under a closed home or under /tmp is
  bound back exactly), all read-only; a private /tmp of MAX_FILE_BYTES in RAM holding its working dir; /proc of its
  own PID namespace; /dev/null, zero, full, random, urandom. No /home, /root, /run, /var, /srv, /mnt, no files of
  the caller or of other users outside those prefixes, no filesystem sockets, no network (abstract sockets included).
  As root we use no user namespace (uid 65534 of a namespace made by root is root outside it, and the kernel's process
  limit does not apply to root): the supervisor keeps only the capabilities to drop privileges and to kill, and drops
  the program to the real uid 65534. Not root, a user namespace maps the caller to uid 65534.
- "nobody" (root, no bubblewrap, and user nobody can run this interpreter): the program runs as the real `nobody`, so
  file permissions and the process limit apply; it sees every world-readable file, reaches the network and any
  socket open to others, and its working dir is bounded per file only.
- "rlimits" (not root and no bubblewrap): the program runs as you with only the limits above. It can read, write and
  signal whatever you can (your files, your tokens, your processes): a one-line warning says so, once.
We never fall back silently: where bubblewrap is installed but cannot run this interpreter, or where we are root
without bubblewrap and `nobody` cannot run it, execute_code raises SandboxUnavailable saying why, unless
NANOCHAT_WEAK_SANDBOX=1 allows the weaker mode (which then warns, naming it).

Memory: each process has maximum_memory_bytes of address space and at most MAX_CHILD_PROCESSES processes run (the
kernel enforces that for uid 65534 and nobody, not in "rlimits" mode as root); under bwrap its files live in the
capped /tmp; what pipes and sockets hold is bounded through MAX_OPEN_FILES. The shared memory calls above are refused.

success means the program ran to its last line: a sys.exit() or os._exit(), even with status 0, is not a pass. This
guards against accidental early exits only, as the program is free to fake it. With `test` (HumanEval), the verdict
is out of the program's hands: the test runs in the supervisor, which never runs model code, calls the program's
top-level functions through a pipe with plain values (what ast.literal_eval reads back), and alone holds the pipe
that reports success. So a program cannot end early, forge the report, read the test, redefine what the test uses
or return an always-equal object to pass; what it returns is compared as data. Not resisted: a program that knows the expected answers (e.g.
memorized the benchmark), and, in "rlimits" mode, a program that attacks the caller's process (it is the same user).
"""

import os
import sys
import json
import errno
import struct
import contextlib
import shutil
import signal
import platform
import tempfile
import threading
import subprocess
from dataclasses import dataclass, fields

from nanochat.errors import NanochatError

DEFAULT_TIMEOUT = 5.0
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024    # RLIMIT_FSIZE for every file the child writes; under bwrap also all of /tmp
MAX_CAPTURE_CHARS = 1_000_000       # how much of stdout/stderr we hand back
MAX_CHILD_PROCESSES = 8             # RLIMIT_NPROC, enforced by the kernel for non-root users
MAX_OPEN_FILES = 64                 # RLIMIT_NOFILE: also bounds what the program can park in pipe and socket buffers
NOBODY_UID = 65534
BWRAP = shutil.which("bwrap")
WEAK_SANDBOX_ENV = "NANOCHAT_WEAK_SANDBOX"
SANDBOX_WORKDIR = "/tmp/work"       # the program's working dir under bwrap, inside the capped private /tmp
# all that bwrap shows of the system besides the interpreter's prefixes, read-only; a symlink (/lib -> usr/lib) is
# recreated as one
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# memfd_create, memfd_secret and shmget make memory that RLIMIT_AS does not count: the seccomp filter refuses them
SHARED_MEMORY_SYSCALLS = {"x86_64": (0xC000003E, (319, 447, 29)), "aarch64": (0xC00000B7, (279, 447, 194))}


class SandboxUnavailable(NanochatError):
    """No isolation we trust can run this interpreter here, and the weaker kind was not explicitly allowed."""


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
# The supervisor: reads the program from stdin, forks it (limits set, privileges dropped, seccomp filter on), then
# reads the test, if any, which the program therefore never holds. The program runs with fresh globals and, at its
# end, says so over a pipe and then answers calls: (name, args, kwargs) in, ("ok", value) or ("error", why) out, each
# a repr read back by ast.literal_eval, so only plain values cross. The supervisor runs the test, which reaches the
# program only through `program` (program.f(x) calls the program's f), and, if the test (or, without one, the
# program) ran to its end, writes to the done pipe, which only it holds. It is not dumpable, so a program of the
# same uid (a user namespace) cannot read its memory or its file descriptors.

_SUPERVISOR = r'''
import os, sys, ast, json, ctypes, struct, signal, resource, traceback, contextlib
limits, drop_uid, done_fd, seccomp, code_size, test_size = json.loads(sys.argv[1])
linux = sys.platform == "linux"
libc = ctypes.CDLL(None, use_errno=True)
if linux:
    libc.prctl(4, 0)  # PR_SET_DUMPABLE
    libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the program's processes become ours
def read_exactly(fd, size):  # never more, so the test is not yet in our memory when we fork
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data
def send(f, obj):
    data = repr(obj).encode()
    f.write(struct.pack(">I", len(data)) + data)
    f.flush()
def receive(f):
    header = f.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    if size > 1 << 22:
        raise ValueError("reply too large")
    return ast.literal_eval(f.read(size).decode())
code = read_exactly(0, code_size).decode()
calls_r, calls_w = os.pipe()
replies_r, replies_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd in (done_fd, calls_w, replies_r):
        os.close(fd)
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if drop_uid is not None:
        os.setgroups([])
        os.setgid(drop_uid)
        os.setuid(drop_uid)
    if seccomp:
        insns = bytes.fromhex(seccomp)
        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
        ulong = ctypes.c_ulong
        if (libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0))  # PR_SET_NO_NEW_PRIVS
                or libc.prctl(22, ulong(2), ctypes.byref(Program(len(insns) // 8, insns)))):  # PR_SET_SECCOMP, filter
            raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")
    calls, replies = os.fdopen(calls_r, "rb"), os.fdopen(replies_w, "wb")
    namespace = {"__name__": "__main__"}
    exec(compile(code, "<llm>", "exec"), namespace)
    send(replies, True)  # the program ran to its end
    for name, args, kwargs in iter(lambda: receive(calls), None):
        try:
            value = namespace[name](*args, **kwargs)
            try:
                ast.literal_eval(repr(value))
            except Exception:
                raise TypeError(f"{name}() returned {value!r:.80}, which is not plain data") from None
            reply = ("ok", value)
        except Exception as e:
            traceback.print_exc()
            reply = ("error", f"{type(e).__name__}: {e}")
        send(replies, reply)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
os.close(calls_r)
os.close(replies_w)
def kill(pid):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
calls, replies = os.fdopen(calls_w, "wb"), os.fdopen(replies_r, "rb")
null = os.open(os.devnull, os.O_RDWR)
def stop(*_):  # the caller's timeout: kill the program; our blocked read or write resumes on /dev/null and ends,
    kill(pid)     # should a process of the program still hold the other end
    for fd in (calls_w, replies_r):
        os.dup2(null, fd)
signal.signal(signal.SIGTERM, stop)
class Program:  # the test's handle on the program: program.f(*args) calls its top-level f
    def __getattr__(self, name):
        def call(*args, **kwargs):
            send(calls, (name, args, kwargs))
            status, value = receive(replies) or ("error", "the program died")
            if status != "ok":
                raise RuntimeError(f"{name}() failed: {value}")
            return value
        return call
finished = False
try:
    test = read_exactly(0, test_size).decode() if test_size >= 0 else None
    ended = receive(replies) is not None  # the program ran to its end
    if ended and test is not None:
        exec(compile(test, "<test>", "exec"), {"__name__": "__main__", "program": Program()})
    finished = ended
except Exception:
    traceback.print_exc()
calls.close()  # the program's loop of answers ends
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
if finished:
    os.write(done_fd, b"1")
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
'''


# -----------------------------------------------------------------------------
# Which isolation this machine allows: probed once per process

_isolation_lock = threading.Lock()
_isolation = None


def _interpreter_prefixes():
    """The interpreter's prefixes (a venv's and its base's), as named and as resolved, less what SYSTEM_PATHS shows
    and what lies inside another of them."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths |= {os.path.realpath(path) for path in paths}
    shown = [path for path in SYSTEM_PATHS if os.path.isdir(path) and not os.path.islink(path)]
    for path in sorted(paths):  # an ancestor sorts before what it holds
        if not any(path == above or path.startswith(above.rstrip(os.sep) + os.sep) for above in shown):
            shown.append(path)
    return [path for path in shown if path not in SYSTEM_PATHS]


def _bwrap_args():
    """bubblewrap's command line (see the module doc): an empty root, shown only what the program needs."""
    if os.geteuid() == 0:  # no user namespace; the supervisor drops the program to uid 65534 (see the module doc)
        user = ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    else:
        user = ["--unshare-user", "--uid", str(NOBODY_UID), "--gid", str(NOBODY_UID), "--cap-drop", "ALL"]
    # the supervisor is PID 1, so no process of bwrap's stands in the sandbox holding our pipes
    args = [BWRAP, "--die-with-parent", "--new-session", "--as-pid-1", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", *user, "--proc", "/proc",
            "--perms", "01777", "--size", str(MAX_FILE_BYTES), "--tmpfs", "/tmp", "--perms", "01777", "--dir",
            SANDBOX_WORKDIR, "--perms", "0755", "--dir", "/etc", "--perms", "0755", "--dir", "/dev"]
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    args += [arg for device in DEVICES for arg in ("--dev-bind-try", device, device)]
    for prefix in _interpreter_prefixes():  # bwrap would make the dirs above it as closed as their originals
        parts = prefix.split(os.sep)
        args += [arg for i in range(2, len(parts)) for arg in ("--perms", "0755", "--dir", os.sep.join(parts[:i]))]
        args += ["--ro-bind", prefix, prefix]
    return args + ["--remount-ro", "/", "--chdir", SANDBOX_WORKDIR]


def _seccomp_filter():
    """The seccomp filter (classic BPF, hex) that fails the SHARED_MEMORY_SYSCALLS, and every call of another ABI
    of this machine (x32, i386: other numbers), with EPERM; "" where we do not know the numbers."""
    if platform.system() != "Linux" or platform.machine() not in SHARED_MEMORY_SYSCALLS:
        return ""
    arch, numbers = SHARED_MEMORY_SYSCALLS[platform.machine()]
    deny, allow = 0x50000 | errno.EPERM, 0x7FFF0000  # SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW
    checks = [(0x35, 0x40000000)] + [(0x15, number) for number in numbers]  # jge: an x32 number; jeq: each call
    program = [(0x20, 0, 0, 4), (0x15, 1, 0, arch), (0x06, 0, 0, deny), (0x20, 0, 0, 0)]  # ld arch; jeq; ret; ld nr
    program += [(op, len(checks) - i, 0, k) for i, (op, k) in enumerate(checks)]  # a match jumps to the last deny
    program += [(0x06, 0, 0, allow), (0x06, 0, 0, deny)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program).hex()


def _probe(mode):
    """'' if `mode` runs a program that imports a few stdlib modules, else why not."""
    result = _execute(mode, "import random, hashlib, math, datetime", timeout=30)  # none loaded by the supervisor
    return "" if result.success else result.error or "failed"


def _probe_isolation():
    """(mode, warning): the strongest isolation that works here, or SandboxUnavailable (see the module doc)."""
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    bwrap_problem = _probe("bwrap") if BWRAP else None
    if bwrap_problem == "":
        return "bwrap", None
    nobody_problem = _probe("nobody") if as_root else None
    weak = "nobody" if nobody_problem == "" else "rlimits"
    if not BWRAP and weak == "nobody":
        return weak, None
    if not BWRAP and not as_root:
        return weak, ("warning: model-written code runs unsandboxed, as this user with only resource limits: "
                      "bubblewrap is not installed; apt-get install bubblewrap to isolate it")
    reason = (f"bubblewrap is installed but cannot run {sys.executable} ({bwrap_problem})" if BWRAP else
              f"bubblewrap is not installed and user nobody cannot run {sys.executable} ({nobody_problem})")
    weak_name = "rlimits isolation, AS ROOT" if weak == "rlimits" and as_root else f"{weak} isolation"
    if os.environ.get(WEAK_SANDBOX_ENV) != "1":
        raise SandboxUnavailable(f"refusing to run model-written code: {reason}; fix that, or set "
                                 f"{WEAK_SANDBOX_ENV}=1 to run it with {weak_name} only")
    return weak, f"warning: {WEAK_SANDBOX_ENV}=1: model-written code runs with {weak_name} only: {reason}"


def isolation():
    """The isolation execute_code uses in this process: "bwrap", "nobody" or "rlimits" (see the module doc).
    Raises SandboxUnavailable where it refuses to run model-written code."""
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


def _run(argv, workdir, root, stdin, timeout, done_w, bwrap):
    """Run the supervisor (under bwrap, if so); returns (returncode, timed_out, stdout, stderr)."""
    stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    timed_out = False
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd=root, env=_child_env(workdir), stdin=subprocess.PIPE, stdout=out,
                                stderr=err, pass_fds=(done_w,), start_new_session=True)
        os.close(done_w)
        try:
            proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            if bwrap:  # SIGKILL to the supervisor, PID 1 of the sandbox: the kernel kills all in it before bwrap ends
                with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                    for pid in f.read().split():
                        os.kill(int(pid), signal.SIGKILL)
            else:
                proc.terminate()  # the supervisor kills the program and everything it started
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # a backstop, should the supervisor itself have been killed
        proc.wait()
    return proc.returncode, timed_out, _read_capped(stdout_path), _read_capped(stderr_path)


def execute_code(code, timeout=DEFAULT_TIMEOUT, maximum_memory_bytes=DEFAULT_MEMORY_BYTES, test=None):
    """Run `code` in a sandboxed fresh interpreter. maximum_memory_bytes=None disables the memory limit. With `test`
    (trusted code), success means that `test` ran to its end, run apart from the program, which it reaches as
    `program` (program.f(x) calls the program's top-level f, with plain values; see the module doc)."""
    return _execute(isolation(), code, timeout, maximum_memory_bytes, test)


def _execute(mode, code, timeout=DEFAULT_TIMEOUT, maximum_memory_bytes=DEFAULT_MEMORY_BYTES, test=None):
    # CPU seconds are a backstop: the wall clock is the real limit
    limits = {"RLIMIT_FSIZE": MAX_FILE_BYTES, "RLIMIT_CPU": int(timeout) + 2, "RLIMIT_CORE": 0,
              "RLIMIT_NPROC": MAX_CHILD_PROCESSES, "RLIMIT_NOFILE": MAX_OPEN_FILES}
    if maximum_memory_bytes is not None and platform.system() != "Darwin":  # macOS refuses these limits
        limits.update(RLIMIT_AS=maximum_memory_bytes, RLIMIT_DATA=maximum_memory_bytes,
                      RLIMIT_STACK=maximum_memory_bytes)
    code, test = code.encode(), None if test is None else test.encode()
    done_r, done_w = os.pipe()
    root = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        drop_uid = NOBODY_UID if mode == "nobody" or (mode == "bwrap" and os.geteuid() == 0) else None
        supervisor = [sys.executable, "-I", "-X", "utf8", "-c", _SUPERVISOR,
                      json.dumps([limits, drop_uid, done_w, _seccomp_filter(), len(code), -1 if test is None
                                  else len(test)])]
        if mode == "bwrap":
            argv, workdir = _bwrap_args() + supervisor, SANDBOX_WORKDIR
        else:
            argv, workdir = supervisor, os.path.join(root, "work")
            os.mkdir(workdir)
            if drop_uid is not None:
                os.chmod(root, 0o711)  # nobody may pass through to its working dir, but not list our files
                os.chown(workdir, NOBODY_UID, NOBODY_UID)
        returncode, timed_out, stdout, stderr = _run(argv, workdir, root, code + (test or b""), timeout, done_w,
                                                     mode == "bwrap")
        os.set_blocking(done_r, False)
        try:
            finished = os.read(done_r, 1) == b"1"
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
