"""
The code sandbox (nanochat/execution.py): normal programs work, and programs that try to hurt the machine or escape
(infinite loop, fork bomb, memory hog, memory outside the address-space limit, writes outside the temp dir, reading
the parent's secrets or a user's private files, Unix sockets, killing other processes, leaving processes behind,
exiting early or forging HumanEval's verdict) are contained while the parent process is left unharmed, under each
isolation mode this machine can run (bwrap, nobody, rlimits; the others skip with a reason). As root, the layouts
that used to run model code as root (a venv under a closed home) and a non-root user (via setpriv) are run in child
processes; a bubblewrap that cannot run is refused, not bypassed. Every escape attempt here is bounded, so a broken
sandbox fails the test without harming the machine.
"""

import os
import re
import sys
import time
import gzip
import json
import signal
import shutil
import tempfile
import threading
import subprocess
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from pathlib import Path

from nanochat import execution
from nanochat.execution import execute_code, ExecutionResult
from tasks.humaneval import run_tests

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
SYSTEM_PYTHON = "/usr/bin/python3"  # an interpreter `nobody` can run, unlike one under a 0700 home
pytestmark = pytest.mark.usefixtures("sandbox_uid")  # conftest.py: one test running sandboxed programs at a time


@pytest.fixture(params=["bwrap", "nobody", "rlimits"])
def mode(request, monkeypatch, capsys):
    """Force one isolation mode, by hiding bubblewrap and (for "rlimits") pretending not to be root."""
    monkeypatch.setattr(execution, "_isolation", None)
    if request.param != "bwrap":
        monkeypatch.setattr(execution, "BWRAP", None)
    if request.param == "nobody" and os.access(SYSTEM_PYTHON, os.X_OK):
        monkeypatch.setattr(sys, "executable", SYSTEM_PYTHON)
    if request.param == "rlimits":
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    got = execution.isolation()
    capsys.readouterr()
    if got != request.param:
        pytest.skip(f"{request.param} isolation cannot run here (this machine gives {got})")
    return got


def test_hello_world():
    result = execute_code("print('hello world')")
    assert result.success and result.stdout == "hello world\n" and result.error is None
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_reported_from_stderr():
    result = execute_code("x = 1\nprint('before')\n1/0")
    assert not result.success
    assert "ZeroDivisionError" in result.error
    assert result.stdout == "before\n"  # output is kept on failure
    assert "Traceback" in result.stderr


def test_main_guard_runs_with_fresh_globals():
    result = execute_code("if __name__ == '__main__':\n    print(sorted(globals()))\n")
    assert result.success, result
    assert result.stdout == "['__builtins__', '__name__']\n"


def test_quotes_backslashes_and_braces_survive():
    code = "s = 'it\\'s \"quoted\" \\\\ {braces} %s'\nprint(s)\nprint(f'{{x}}')"
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "it's \"quoted\" \\ {braces} %s\n{x}\n"


def test_infinite_loop_times_out_quickly():
    start = time.time()
    result = execute_code("while True:\n    pass", timeout=1.0)
    elapsed = time.time() - start
    assert result.timeout and not result.success
    assert "timed out" in result.error
    assert elapsed < 5, f"took {elapsed:.1f}s"


def test_sleeping_child_is_killed_with_its_process_group():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = execute_code("import time\ntime.sleep(60)", timeout=0.5)
    assert result.timeout
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before


def test_memory_hog_is_stopped():
    result = execute_code("x = bytearray(1024 * 1024 * 1024)\nprint('allocated')")
    assert not result.success
    assert result.memory_exceeded
    assert "allocated" not in result.stdout


def test_growing_memory_hog_is_stopped():
    code = "chunks = []\nfor _ in range(100):\n    chunks.append(b'x' * (32 * 1024 * 1024))\nprint('done')"
    result = execute_code(code, timeout=10.0, maximum_memory_bytes=128 * 1024 * 1024)
    assert not result.success and result.memory_exceeded


def test_memory_limit_can_be_disabled():
    result = execute_code("x = bytearray(64 * 1024 * 1024)\nprint(len(x))", maximum_memory_bytes=None)
    assert result.success, result
    assert result.stdout.strip() == str(64 * 1024 * 1024)


# How the guard-era sandbox was escaped: a fresh ctypes (popped from sys.modules first) and a fresh posix module
PROBE_HEADER = r"""
import os, sys, signal, importlib.util
sys.modules.pop('ctypes', None)
sys.modules.pop('_ctypes', None)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
spec = importlib.util.find_spec('posix')
posix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(posix)
def ok(rc):
    assert rc == 0, rc
"""


def sleepers(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", marker]]


@pytest.fixture
def marker():
    """A unique `sleep` argument, so the test finds exactly the processes its program started."""
    marker = f"{60 + int.from_bytes(os.urandom(3), 'big') / 1e7:.7f}"
    yield marker
    for p in sleepers(marker):  # a broken sandbox must not leave them running
        p.kill()


def test_fork_bomb_is_bounded_and_leaves_nothing_behind(mode, marker):
    # 200 attempts, each child sleeps (so it counts against the process limit) until the sandbox kills it
    code = PROBE_HEADER + f"""
forks = 0
for i in range(200):
    try:
        pid = (posix.fork if i % 2 else libc.fork)()
    except OSError:
        pid = -1
    if pid < 0:
        break
    if pid == 0:
        posix.execv('/bin/sleep', ['sleep', {marker!r}])
    forks += 1
print('forks=%d' % forks)
"""
    result = execute_code(code, timeout=10.0)
    assert result.success, result
    forks = int(result.stdout.split("=")[1])
    # the kernel enforces RLIMIT_NPROC only for a non-root user: rlimits mode as root has no process cap
    if mode != "rlimits":
        assert forks < execution.MAX_CHILD_PROCESSES
    assert sleepers(marker) == [], "the sandbox left processes behind"


def test_setsid_double_fork_does_not_outlive_the_call(mode, marker):
    code = PROBE_HEADER + f"""
if libc.fork() == 0:
    libc.setsid()
    if libc.fork() == 0:
        posix.execv('/bin/sleep', ['sleep', {marker!r}])
    posix._exit(0)
import time
def running():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if open('/proc/%s/cmdline' % pid, 'rb').read() == b'sleep\\x00{marker}\\x00':
                return True
        except OSError:
            pass
while not running():
    time.sleep(0.01)  # wait until the grandchild runs, so the check below is not vacuous
print('started')
"""
    result = execute_code(code, timeout=10.0)
    assert result.success and result.stdout == "started\n", result
    assert sleepers(marker) == [], "a double-forked process outlived the call"


def test_a_process_holding_the_supervisors_pipe_does_not_outlive_a_timeout(mode, marker):
    # the program ends early, leaving a process that holds the pipe its supervisor waits on (kept open through exec)
    code = f"""
import os
if os.fork() == 0:
    os.setsid()
    for fd in range(3, 64):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass
    os.execv('/bin/sleep', ['sleep', {marker!r}])
os._exit(0)
"""
    result = execute_code(code, timeout=1.0)
    assert result.timeout and not result.success, result
    assert sleepers(marker) == [], "a process of the program outlived the call"


@pytest.fixture
def outside_dir():
    """A directory beside the code, outside the sandbox's temp dir (and outside /tmp, which bwrap replaces)."""
    path = Path(__file__).resolve().parent / f".sandbox_escape_{os.getpid()}"
    path.mkdir()
    (path / "sentinel.txt").write_text("keep me")
    yield path
    shutil.rmtree(path)


def test_files_processes_and_secrets_of_the_parent_are_out_of_reach(mode, outside_dir):
    if mode == "rlimits":
        pytest.skip("rlimits isolation runs the program as this user: what we may touch, it may (the warning says so)")
    sentinel = outside_dir / "sentinel.txt"
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = PROBE_HEADER + f"""
outside, sentinel, victim, parent = {str(outside_dir)!r}, {str(sentinel)!r}, {victim.pid}, {os.getpid()}
def link_and_write():
    os.link(sentinel, 'hardlink')
    open('hardlink', 'w').write('x')
routes = {{
    'open': lambda: open(os.path.join(outside, 'new.txt'), 'w').write('x'),
    'truncate': lambda: open(sentinel, 'w'),
    'unlink': lambda: posix.unlink(sentinel),
    'ctypes-unlink': lambda: ok(libc.unlink(sentinel.encode())),
    'dir_fd': lambda: os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=os.open(outside, os.O_RDONLY)),
    'link': link_and_write,
    'environ': lambda: open('/proc/%d/environ' % parent, 'rb').read(),
    'kill': lambda: posix.kill(victim, signal.SIGKILL),
    'ctypes-kill': lambda: ok(libc.kill(victim, signal.SIGKILL)),
    'signal-parent': lambda: ok(libc.kill(parent, 0)),  # signal 0: only asks whether we could
}}
escaped = []
for name, fn in routes.items():
    try:
        fn()
        escaped.append(name)
    except Exception:
        pass
print('escaped=' + ','.join(escaped))
"""
        result = execute_code(code)
        assert result.success, result
        assert result.stdout.strip() == "escaped="
        assert sentinel.read_text() == "keep me"
        assert sorted(p.name for p in outside_dir.iterdir()) == ["sentinel.txt"]
        assert victim.poll() is None, "the sandbox killed a process of ours"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("snippet", [
    "exit(0)",
    "import sys\nsys.exit(0)",
    "import os\nos._exit(0)",
    "import os\nos.kill(os.getpid(), 9)",
    "import os\nos.execv('/bin/true', ['true'])",
    "input()",
])
def test_a_program_that_stops_early_is_not_a_success(snippet):
    result = execute_code(snippet + "\nprint('end')")
    assert not result.success, f"{snippet!r} should fail: {result}"
    assert "end" not in result.stdout


def humaneval_problems():
    if not HUMANEVAL.exists():
        pytest.skip(f"HumanEval data not found at {HUMANEVAL}")
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def grade(row, solution):
    return run_tests(row["prompt"], row["prompt"] + solution, row["test"], row["entry_point"])


def test_humaneval_canonical_solutions_pass_and_early_exits_fail(mode):
    problems = humaneval_problems()
    assert len(problems) == 164
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda row: grade(row, row["canonical_solution"]), problems))
    failed = [row["task_id"] for row, r in zip(problems, results) if not r.success]
    assert failed == [], [r for r in results if not r.success][:3]
    assert {r.isolation for r in results} == {mode}
    # a wrong solution that exits with status 0 before the tests can fail them
    row = problems[0]
    for exit_call in ("__import__('sys').exit(0)", "__import__('os')._exit(0)"):
        result = grade(row, f"    return None\n\n{exit_call}\n")
        assert not result.success, result


def test_only_weak_isolation_warns_once(mode, capsys, monkeypatch):
    monkeypatch.setattr(execution, "_isolation", None)
    assert execution.isolation() == mode
    assert execution.isolation() == mode
    err = capsys.readouterr().err
    if mode == "rlimits":
        assert err.count("\n") == 1 and err.startswith("warning: ") and "apt-get install bubblewrap" in err
    else:
        assert err == ""


def test_writes_stay_in_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "open('inside.txt', 'w').write('hi')\nprint(open('inside.txt').read())\nimport os\nprint(os.listdir('.'))"
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "hi\n['inside.txt']\n"
    assert not (tmp_path / "inside.txt").exists()  # not in the caller's cwd


def test_parent_secrets_are_not_visible():
    # The secret must be in the parent's *initial* environment (what /proc/<pid>/environ shows), so the parent here
    # is a fresh interpreter started with it.
    if execution.isolation() == "rlimits":
        pytest.skip("rlimits isolation runs the program as this user, who may read our /proc entries")
    secret = "hunter2-nanochat-test-secret"
    child_code = r"""
import os
print(dict(os.environ))
for path in ('/proc/%d/environ' % PARENT, '/proc/%d/cmdline' % PARENT):
    try:
        print(open(path, 'rb').read())
    except Exception as e:
        print('blocked', type(e).__name__)
"""
    parent_code = ("import os, sys\nfrom nanochat.execution import execute_code\n"
                   "r = execute_code(sys.stdin.read().replace('PARENT', str(os.getpid())))\n"
                   "print(r.stdout)\nprint(r.stderr)")
    env = dict(os.environ, NANOCHAT_TEST_SECRET=secret, OMP_NUM_THREADS="1")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", parent_code], input=child_code, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("blocked") == 2 and "PATH" in out.stdout, out.stdout
    assert secret not in out.stdout
    assert "NANOCHAT_TEST_SECRET" not in out.stdout


def test_huge_output_is_capped():
    result = execute_code("import sys\nsys.stdout.write('x' * 5_000_000)")
    assert result.success, result
    assert len(result.stdout) < 1_100_000 and result.stdout.endswith("[output truncated]")


def test_works_from_a_thread_and_in_parallel():
    results = [None] * 3

    def run(i):
        results[i] = execute_code(f"print({i} * 2)")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.stdout for r in results] == ["0\n", "2\n", "4\n"]


def test_parent_is_unharmed():
    cwd, env = os.getcwd(), dict(os.environ)
    execute_code("import os\nos.environ.clear()\nos.chdir('/')\nos.kill(os.getppid(), 9)")
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert subprocess.run(["true"]).returncode == 0  # the parent can still spawn processes
    assert os.path.exists(os.__file__)


def test_result_repr_shows_only_what_matters():
    assert repr(ExecutionResult(success=True, stdout="", stderr="")) == "ExecutionResult(success=True)"
    text = repr(ExecutionResult(success=False, stdout="", stderr="", error="boom", timeout=True))
    assert "error='boom'" in text and "timeout=True" in text and "memory_exceeded" not in text


def test_bwrap_shows_the_system_and_the_interpreter_prefixes_only(monkeypatch):
    # a venv in a clone under /tmp (hidden by the private /tmp) and a base interpreter under a closed home (pyenv):
    # both bound back exactly, the dirs above them made open to uid 65534; nothing else of / is shown
    monkeypatch.setattr(sys, "prefix", "/tmp/ci/clone/.venv")
    monkeypatch.setattr(sys, "exec_prefix", "/tmp/ci/clone/.venv")
    monkeypatch.setattr(sys, "executable", "/tmp/ci/clone/.venv/bin/python")
    monkeypatch.setattr(sys, "base_prefix", "/home/u/.pyenv/versions/3.11.7")
    monkeypatch.setattr(sys, "base_exec_prefix", "/home/u/.pyenv/versions/3.11.7")
    args = execution._bwrap_args()
    text = " ".join(args)
    assert "--ro-bind / /" not in text and "--dev /dev" not in text
    assert "--perms 0755 --dir /tmp/ci --perms 0755 --dir /tmp/ci/clone --ro-bind /tmp/ci/clone/.venv" in text
    assert "--perms 0755 --dir /home/u/.pyenv/versions --ro-bind /home/u/.pyenv/versions/3.11.7" in text
    assert text.index("--tmpfs /tmp") < text.index("--ro-bind /tmp/ci/clone/.venv")
    assert f"--size {execution.MAX_FILE_BYTES} --tmpfs /tmp" in text
    shown = {args[i + 2] for i, arg in enumerate(args) if arg in ("--ro-bind", "--symlink", "--dev-bind-try")}
    assert shown <= set(execution.SYSTEM_PATHS) | set(execution.DEVICES) | {
        "/tmp/ci/clone/.venv", "/home/u/.pyenv/versions/3.11.7", os.path.dirname(os.path.realpath(sys.executable))}
    assert args[-3:] == ["/", "--chdir", execution.SANDBOX_WORKDIR] and args[-4] == "--remount-ro"


def test_under_bwrap_the_program_sees_the_system_and_its_interpreter_only(mode):
    if mode != "bwrap":
        pytest.skip("the other modes show the whole filesystem (the module doc says so)")
    code = ("import os, json, time\nopen('/dev/null', 'w').write('x')\nopen('/dev/urandom', 'rb').read(8)\n"
            "time.localtime()\nprint(json.dumps([sorted(os.listdir('/')), sorted(os.listdir('/dev'))]))")
    result = execute_code(code)
    assert result.success, result
    top, dev = json.loads(result.stdout)
    prefixes = {path.split(os.sep)[1] for path in execution._interpreter_prefixes()}
    assert set(top) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"} | prefixes
    assert set(dev) <= {os.path.basename(device) for device in execution.DEVICES}


# -----------------------------------------------------------------------------
# Never silently weaker: a broken bubblewrap, or root with neither bubblewrap nor a working `nobody`, is refused

@pytest.fixture
def fresh_isolation(monkeypatch):
    monkeypatch.setattr(execution, "_isolation", None)
    monkeypatch.delenv(execution.WEAK_SANDBOX_ENV, raising=False)


def test_a_bubblewrap_that_cannot_run_is_refused_not_bypassed(fresh_isolation, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(execution, "BWRAP", str(broken))
    with pytest.raises(execution.SandboxUnavailable) as refusal:
        execution.isolation()
    message = str(refusal.value)
    assert f"bubblewrap is installed but cannot run {sys.executable}" in message
    assert "setting up uid map: Permission denied" in message and execution.WEAK_SANDBOX_ENV in message
    with pytest.raises(execution.SandboxUnavailable):
        execute_code("print(1)")
    # the explicit opt-in runs the weaker mode, and says so
    monkeypatch.setenv(execution.WEAK_SANDBOX_ENV, "1")
    if os.geteuid() == 0 and os.access(SYSTEM_PYTHON, os.X_OK):
        monkeypatch.setattr(sys, "executable", SYSTEM_PYTHON)  # an interpreter `nobody` can run
    capsys.readouterr()
    mode = execution.isolation()
    assert mode in ("nobody", "rlimits")
    warning = capsys.readouterr().err
    assert warning.startswith(f"warning: {execution.WEAK_SANDBOX_ENV}=1") and f"{mode} isolation" in warning
    assert execute_code("print(1)").isolation == mode


def test_root_without_bubblewrap_refuses_when_nobody_cannot_run_the_interpreter(fresh_isolation, monkeypatch,
                                                                                 capsys):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    monkeypatch.setattr(execution, "BWRAP", None)
    why = "ModuleNotFoundError: No module named 'random'"
    monkeypatch.setattr(execution, "_probe", lambda *args: why)  # what `nobody` meets behind a closed home
    with pytest.raises(execution.SandboxUnavailable, match=f"user nobody cannot run .*{re.escape(why)}"):
        execution.isolation()
    monkeypatch.setenv(execution.WEAK_SANDBOX_ENV, "1")
    capsys.readouterr()
    assert execution.isolation() == "rlimits"  # as root: only on request, and the warning says so
    assert "rlimits isolation, AS ROOT" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# What the program can reach: a root-owned venv under a closed home (run as root), and a user's own files and
# sockets (run as that user). PROBE tries each route; CHILD runs it directly (all must work: not vacuous), then
# sandboxed (none may).

PROBE = r"""
import os, json, socket
def connect(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
routes = {
    'read a private file': lambda: open(PRIVATE).read(),
    'write beside it': lambda: open(ESCAPE, 'w').write('x'),
    'list the home': lambda: os.listdir(HOME).index('.netrc'),  # bwrap may show it empty: the way to a venv
    "read the parent's environment": lambda: open('/proc/%d/environ' % PARENT, 'rb').read(),
    'signal the parent': lambda: os.kill(PARENT, 0),
    'a socket of one of our groups': lambda: connect(GROUP_SOCKET),
    'a world-writable socket': lambda: connect(WORLD_SOCKET),
    'an abstract socket': lambda: connect('\0' + ABSTRACT_SOCKET),
}
reached = []
for name, route in routes.items():
    try:
        route()
        reached.append(name)
    except Exception:
        pass
print(json.dumps({'uid': os.getuid(), 'reached': reached}))
"""

CHILD = r"""
import os, io, sys, json, contextlib
from nanochat.execution import execute_code, SandboxUnavailable
program, escape = sys.stdin.read().replace('PARENT', str(os.getpid())), sys.argv[1]
with contextlib.redirect_stdout(io.StringIO()) as direct:
    exec(program, {})
os.remove(escape)
try:
    result = execute_code(program, timeout=20)
except SandboxUnavailable as e:
    print(json.dumps({'refused': str(e)}))
    sys.exit(0)
sandboxed = json.loads(result.stdout) if result.success else result.error
print(json.dumps({'direct': json.loads(direct.getvalue()), 'sandboxed': sandboxed, 'isolation': result.isolation}))
"""

SANDBOX_UID, SANDBOX_GID, SOCKET_GID = 54320, 54320, 54321


@pytest.fixture
def sockets(outside_the_repo):
    """Listening Unix sockets outside /tmp: one only group SOCKET_GID may open (the docker.sock pattern), one
    world-writable, one abstract."""
    import socket
    path = outside_the_repo / "sockets"
    path.mkdir()
    servers = {}
    for name, mode_bits in (("group", 0o660), ("world", 0o777)):
        servers[name] = socket.socket(socket.AF_UNIX)
        servers[name].bind(str(path / f"{name}.sock"))
        os.chmod(path / f"{name}.sock", mode_bits)
    os.chown(path / "group.sock", 0, SOCKET_GID)
    servers["abstract"] = socket.socket(socket.AF_UNIX)
    servers["abstract"].bind(f"\0nanochat-sandbox-test-{os.getpid()}")
    for server in servers.values():
        server.listen()
    yield {"GROUP_SOCKET": str(path / "group.sock"), "WORLD_SOCKET": str(path / "world.sock"),
           "ABSTRACT_SOCKET": f"nanochat-sandbox-test-{os.getpid()}"}
    for server in servers.values():
        server.close()
    shutil.rmtree(path)


@pytest.fixture
def outside_the_repo():
    """A folder every user may traverse, outside /tmp and outside the repo: a clone may sit under a 0700 dir (what
    mktemp -d makes), where another uid could reach neither its home nor the library. It holds the homes, the
    sockets and a copy of the sandbox's modules for the probe's interpreter (lib/)."""
    base = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-test-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    base.chmod(0o755)
    lib = base / "lib" / "nanochat"
    lib.mkdir(parents=True)
    for name in ("__init__.py", "errors.py", "execution.py"):  # execution imports nothing else of ours
        shutil.copy(Path(execution.__file__).with_name(name), lib / name)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def private_home(outside_the_repo):
    """A home dir closed to others (0700, like /root), outside /tmp, holding a 0600 secret; the caller chowns it."""
    path = outside_the_repo / "home"
    path.mkdir(mode=0o700)
    (path / ".netrc").write_text("machine example.com password hunter2")
    (path / ".netrc").chmod(0o600)
    yield path
    shutil.rmtree(path)


def run_probe(argv, home, sockets, env=None):
    constants = dict(sockets, PRIVATE=str(home / ".netrc"), ESCAPE=str(home / "escaped.txt"), HOME=str(home))
    program = "".join(f"{name} = {value!r}\n" for name, value in constants.items()) + PROBE
    env = dict(env or {}, PATH="/usr/bin:/bin", PYTHONPATH=str(home.parent / "lib"),
               NANOCHAT_TEST_SECRET="hunter2")
    out = subprocess.run(argv + ["-c", CHILD, constants["ESCAPE"]], input=program, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not (home / "escaped.txt").exists(), "the sandboxed program wrote into the private home"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    if "refused" not in report:
        assert report["direct"]["reached"] == json.loads(PROBE_ROUTES), "the probe is vacuous here"
    return report


PROBE_ROUTES = json.dumps(["read a private file", "write beside it", "list the home", "read the parent's environment",
                           "signal the parent", "a socket of one of our groups", "a world-writable socket",
                           "an abstract socket"])


@pytest.fixture
def root_with_bwrap():
    if os.geteuid() != 0 or not execution.BWRAP:
        pytest.skip("needs root and bubblewrap")


def test_a_venv_under_a_closed_home_runs_as_65534_under_bwrap_as_root(root_with_bwrap, private_home, sockets):
    # `python -m venv ~/venv` as root: sys.prefix under the 0700 /root. It must run under bwrap as uid 65534 (or be
    # refused), never as root with only rlimits
    venv = private_home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    report = run_probe([str(venv / "bin" / "python")], private_home, sockets)
    if "refused" in report and execution.isolation() != "bwrap":
        pytest.skip(f"bubblewrap does not work on this machine at all: {report['refused']}")
    assert "refused" not in report, report
    assert report["isolation"] == "bwrap" and report["sandboxed"] == {"uid": 65534, "reached": []}, report


def test_a_user_cannot_reach_their_own_files_and_sockets_under_bwrap(root_with_bwrap, private_home, sockets):
    # as a user with a 0600 file in their home and a group that opens a socket; run with setpriv, no user needed
    if not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs setpriv and {SYSTEM_PYTHON}")
    for path in (private_home, private_home / ".netrc"):
        os.chown(path, SANDBOX_UID, SANDBOX_GID)
    setpriv = ["setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", f"--groups={SOCKET_GID}"]
    report = run_probe(setpriv + [SYSTEM_PYTHON], private_home, sockets, env={"HOME": str(private_home)})
    if "refused" in report:
        pytest.skip(f"bubblewrap cannot run for a non-root user here: {report['refused']}")
    assert report["isolation"] == "bwrap" and report["sandboxed"] == {"uid": 65534, "reached": []}, report


# -----------------------------------------------------------------------------
# Memory outside the address-space limit: memfd and SysV shared memory are refused (every mode), and under bwrap
# /tmp and the working dir together hold at most MAX_FILE_BYTES

PIN_MEMORY = r"""
import os, json, ctypes
MB = 1 << 20
held = {}
fds = []
try:
    for _ in range(32):  # 32 x 16 MB = 512 MB, each file under RLIMIT_FSIZE
        fds.append(os.memfd_create('pin'))
        for _ in range(16):
            os.write(fds[-1], b'x' * MB)
except OSError:
    pass
held['memfd'] = sum(os.fstat(fd).st_size for fd in fds)
libc = ctypes.CDLL(None, use_errno=True)
segment = libc.shmget(0, MB, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
if segment >= 0:
    libc.shmctl(segment, 0, None)  # IPC_RMID: leave nothing behind
held['shmget'] = segment >= 0
def fill(directory):
    total = 0
    try:
        for i in range(16):  # 16 x 32 MB = 512 MB
            with open(os.path.join(directory, 'fill%d' % i), 'wb') as f:
                for _ in range(32):
                    total += f.write(b'x' * MB)
    except OSError:
        pass
    return total
held['files'] = fill('/tmp') + fill('.')
print(json.dumps(held))
"""


def test_memory_outside_the_address_space_limit_is_capped(mode):
    result = execute_code(PIN_MEMORY, timeout=20)
    assert result.success, result
    held = json.loads(result.stdout)
    assert held["memfd"] == 0 and held["shmget"] is False, held
    if mode == "bwrap":  # elsewhere the working dir is on the host's disk, bounded per file only (the doc says so)
        assert held["files"] <= execution.MAX_FILE_BYTES, held


# -----------------------------------------------------------------------------
# HumanEval grading: the verdict is out of the program's reach

DIG_THE_TOKEN = ("    return None\n\nimport os, sys; os.write(sys.modules['__main__'].done_fd, "
                 "sys.modules['__main__'].token); os._exit(0)\n")


def test_humaneval_forged_passes_fail():
    problems = humaneval_problems()
    with ThreadPoolExecutor(4) as pool:
        passed = sum(r.success for r in pool.map(lambda row: grade(row, DIG_THE_TOKEN), problems))
    assert passed == 0, f"the token dig passed {passed}/164"
    forgeries = {
        "write to every fd we can find": "    return None\n\nimport os\n"
            "for d in ('/proc/self/fd', '/proc/1/fd', '/proc/%d/fd' % os.getppid()):\n"
            "    for fd in (os.listdir(d) if os.access(d, os.R_OK) else []):\n        try:\n"
            "            os.write(os.open(os.path.join(d, fd), os.O_WRONLY), b'1')\n"
            "        except OSError:\n            pass\nos._exit(0)\n",
        "an always-equal return value": "    class Anything:\n        __eq__ = lambda self, other: True\n"
            "        __sub__ = lambda self, other: 0\n    return Anything()\n",
        "a builtin the test uses, shadowed": "    return 0.0\n\ndef abs(x):\n    return 0\n",
    }
    problem = {row["task_id"]: row for row in problems}
    for name, solution in forgeries.items():  # HumanEval/4's asserts all read abs(candidate(...) - y) < 1e-6
        result = grade(problem["HumanEval/4"], solution)
        assert not result.success, f"{name}: {result}"
    # HumanEval/32 checks poly(coeffs, candidate(coeffs)) == 0 with the prompt's poly: a program's poly is not used
    result = grade(problem["HumanEval/32"], "    return 0.0\n\ndef poly(xs, x):\n    return 0.0\n")
    assert not result.success, result
