"""
The code sandbox (nanochat/execution.py): normal programs work, and programs that try to hurt the machine or escape
(infinite loop, fork bomb, memory hog, writes outside the temp dir, reading the parent's secrets) are contained
while the parent process is left unharmed. Every escape attempt here is bounded, so a broken sandbox fails the test
without harming the machine.
"""

import os
import sys
import time
import threading
import subprocess

import psutil
import pytest

from nanochat.execution import execute_code, ExecutionResult


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


def test_main_guard_runs_and_prelude_is_invisible():
    code = ("if __name__ == '__main__':\n    print(sorted(globals()))\n"
            "try:\n    _nanochat_guard\nexcept NameError:\n    print('guard hidden')\n")
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "['__builtins__', '__name__']\nguard hidden\n"


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


def test_fork_bomb_is_contained():
    # A bounded fork bomb: at most 20 attempts per route; a successful fork's child exits at once. Every route must
    # fail inside the sandbox.
    code = r"""
import os
forks = 0
def attempt(fn):
    global forks
    for _ in range(20):
        try:
            pid = fn()
        except Exception:
            return
        if pid == 0:
            os._exit(0)
        forks += 1
attempt(lambda: os.fork())
import posix
attempt(lambda: posix.fork())
def spawn():
    return os.posix_spawn('/bin/true', ['/bin/true'], {})
attempt(spawn)
def popen():
    import subprocess
    return subprocess.Popen(['/bin/true']).pid
attempt(popen)
def mp():
    import multiprocessing
    p = multiprocessing.Process(target=print)
    p.start()
    return p.pid
attempt(mp)
def ctypes_fork():
    import ctypes
    return ctypes.CDLL(None).fork()
attempt(ctypes_fork)
def system():
    return os.system('true') + 1
attempt(system)
print('forks=%d' % forks)
"""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = execute_code(code, timeout=10.0)
    assert result.success, result
    assert result.stdout.strip() == "forks=0"
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before, "the sandbox left processes behind"


@pytest.mark.parametrize("snippet", [
    "import os\nos.system('true')",
    "import shutil\nshutil.rmtree('.')",
    "import subprocess\nsubprocess.Popen(['true'])",
    "import os\nos.kill(os.getpid(), 9)",
    "import os\nos.fork()",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.chdir('/')",
    "import resource",
    "input()",
    "exit(0)",
])
def test_destructive_functions_are_disabled(snippet):
    result = execute_code(snippet)
    assert not result.success, f"{snippet!r} should fail: {result}"


def test_writes_stay_in_the_temp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = "open('inside.txt', 'w').write('hi')\nprint(open('inside.txt').read())\nimport os\nprint(os.listdir('.'))"
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == "hi\n['inside.txt']\n"
    assert not (tmp_path / "inside.txt").exists()  # not in the caller's cwd


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    target = tmp_path / "escape.txt"
    code = f"""
import os, io, pathlib, shutil
routes = {{
    'open': lambda: open({str(target)!r}, 'w').write('x'),
    'append': lambda: open({str(sentinel)!r}, 'a').write('x'),
    'pathlib': lambda: pathlib.Path({str(target)!r}).write_text('x'),
    'os.open': lambda: os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT),
    'FileIO': lambda: io.FileIO({str(target)!r}, 'w'),
    'relative': lambda: open('../../escape_rel.txt', 'w').write('x'),
    'remove': lambda: os.remove({str(sentinel)!r}),
    'rmtree': lambda: shutil.rmtree({str(tmp_path)!r}),
    'copy': lambda: shutil.copy({str(sentinel)!r}, {str(target)!r}),
    'mkdir': lambda: os.mkdir({str(tmp_path / 'newdir')!r}),
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
    assert not target.exists() and not (tmp_path / "newdir").exists()


def test_parent_secrets_are_not_visible(tmp_path):
    # The secret must be in the parent's *initial* environment (what /proc/<pid>/environ shows), so the parent here
    # is a fresh interpreter started with it.
    secret = "hunter2-nanochat-test-secret"
    child_code = r"""
import os
print(dict(os.environ))
for path in ('/proc/%d/environ' % os.getppid(), '/proc/%d/cmdline' % os.getppid(), '/proc/1/environ'):
    try:
        print(open(path, 'rb').read())
    except Exception as e:
        print('blocked', type(e).__name__)
"""
    parent_code = ("import sys\nfrom nanochat.execution import execute_code\n"
                   "r = execute_code(sys.stdin.read())\nprint(r.stdout)\nprint(r.stderr)")
    env = dict(os.environ, NANOCHAT_TEST_SECRET=secret, OMP_NUM_THREADS="1")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo_root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", parent_code], input=child_code, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "blocked" in out.stdout and "PATH" in out.stdout
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
