"""
Shared test fixtures: a temporary base dir, a tiny tokenizer, tiny GPT models, and the real data beside the repo.
Everything here is small enough to build in seconds on a 2-core CPU and needs no network.
"""

import os
import fcntl
import inspect
import pathlib
import tempfile

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# One intra-op thread per test process: the tensors here are tiny, and a second thread only adds spin-wait
# contention (tests/test_hf.py took 2-4x the CPU time with two on a busy 2-core machine). dev/test.sh runs one
# pytest-xdist worker per CPU instead.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked perf pin a performance property, not behaviour: they are left out unless -m names them (pytest -m
    perf), so neither the default run nor the quick loop (-m 'not slow') pays for them or fails on a busy machine."""
    if "perf" in config.option.markexpr:
        return
    perf = [item for item in items if item.get_closest_marker("perf")]
    if perf:
        config.hook.pytest_deselected(items=perf)
        items[:] = [item for item in items if not item.get_closest_marker("perf")]


def tiny_corpus():
    """Real English text that every Python install carries: docstrings of a few stdlib modules."""
    import json, collections, argparse, pathlib as pl, textwrap, string, random, functools
    texts = []
    for module in (json, collections, argparse, pl, textwrap, string, random, functools):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                texts.append(doc)
    return sorted(set(texts))


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR so tests never touch ~/.cache/nanochat."""
    path = tmp_path / "nanochat_base"
    path.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


@pytest.fixture
def single_thread():
    """One intra-op thread for the test whatever an earlier test set (one is also this file's default): a second only
    adds spin-wait contention to tiny tensors on a shared 2-core machine (~50x slower). Opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    return RustBPETokenizer.train_from_iterator(iter(tiny_corpus()), vocab_size=512)


def make_tiny_model(vocab_size, n_layer=2, n_embd=64, n_head=2, sequence_len=64, window_pattern="SL", seed=0,
                    n_kv_head=None):
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head or n_head, n_embd=n_embd, window_pattern=window_pattern)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


@pytest.fixture
def tiny_model_factory():
    return make_tiny_model


class RowCounter:
    """A model for the Engine that records the rows of every forward (to see what was decoded together)."""

    def __init__(self, model):
        self.model, self.config, self.rows = model, model.config, []

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        self.rows.append(ids.size(0))
        return self.model.forward(ids, kv_cache=kv_cache)


@pytest.fixture
def sandbox_uid():
    """For tests that run programs in nanochat.execution's sandbox. The programs run as uid 65534, whose process limit
    (RLIMIT_NPROC) the kernel counts across the machine, so a fork bomb of one test would leave a sandboxed program of
    another (a pytest-xdist worker, another run of the suite) unable to start: one such test at a time per machine."""
    path = os.path.join(tempfile.gettempdir(), "nanochat-tests-sandbox.lock")
    try:
        fd = os.open(path, os.O_RDONLY)  # not O_CREAT: a sticky /tmp refuses that on another user's file
    except FileNotFoundError:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o444)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (it sits beside the repo as ../shared/data)")
    return SHARED_DATA


@pytest.fixture
def full_disk(monkeypatch):
    """Every checkpoint file write fails as on a full disk."""
    import errno
    from nanochat import checkpoint_manager

    def write_nothing(path, write_fn, mode="wb"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint_manager, "atomic_write", write_nothing)


def terminate_after_line(proc, prefix, timeout=240):
    """SIGTERM proc (started with text stdout, stderr merged in) once it prints a line starting with prefix: a step
    has trained and the handlers are in place. Waits on the output, not on a clock. Returns all it printed."""
    import time
    import signal
    seen = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen[-50:])
    rest, _ = proc.communicate(timeout=120)
    return "".join(seen) + rest


def script_cmd(module, args, nproc=1):
    """The command line of `python -m <module>`, under torchrun (--standalone) when nproc > 1."""
    import sys
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", module, *args]
