"""
The CPU allocator setting (keep_freed_memory) and the training-loop helpers in nanochat.training that base_train, chat_sft and chat_rl share: the cadence of periodic
work (is_due) and the tail of an optimizer step (finish_step); and the one JSONL reader (iter_jsonl) of the tasks,
the CORE bundle and --from-dir builds.
"""

import os
import sys
import gzip
import platform
import subprocess

import pytest
import torch

from nanochat.common import iter_jsonl
from nanochat.training import is_due, finish_step
from conftest import REPO_ROOT


PAGE_FAULTS_OF_STEADY_STEPS = """
import sys, resource, torch
from nanochat.training import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory("cpu")
def step():  # like a training step: two 64 MiB buffers, a product, all freed again
    x, y = torch.empty(2**24).fill_(1.0), torch.empty(2**24).fill_(2.0)
    return (x * y).sum()
for _ in range(5):  # the heap grows to its steady size (64-byte-aligned blocks need a few steps to fit freed ones)
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.perf
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """Steps that allocate and free the same 64 MiB buffers: glibc alone maps each afresh (16k page faults per
    buffer with 4 KiB pages); after keep_freed_memory("cpu") and a few steps the freed blocks are reused from the heap
    (in a clean clone the heap reached its steady size after 2-3 steps, in every one of 5 processes)."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_OF_STEADY_STEPS, mode], cwd=REPO_ROOT, capture_output=True,
                             text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])
    default, keep = faults("default"), faults("keep")
    assert keep * 10 < default, (keep, default)


def test_is_due_cadence():
    def due(every, **kwargs):
        return [s for s in range(11) if is_due(s, every, last_step=s == 10, **kwargs)]
    assert due(4) == [4, 8, 10]  # every 4 steps and at the last one, never at step 0
    assert due(4, at_step_zero=True) == [0, 4, 8, 10]
    assert due(-1) == [] and due(0, at_step_zero=True) == []  # off, even at the last step


def make_optimizer():
    muon_param, adam_param = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [muon_param], "kind": "muon", "momentum": 0.0},
                                 {"params": [adam_param], "kind": "adamw", "momentum": 0.0}], lr=0.1)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer, muon_param, adam_param


def test_finish_step_sets_the_step_hyperparameters_updates_and_drops_grads():
    optimizer, muon_param, adam_param = make_optimizer()
    (muon_param.sum() + adam_param.sum()).backward()
    finish_step(optimizer, None, 0.5, momentum=0.9, weight_decay=0.01, update=False)
    muon_group, adam_group = optimizer.param_groups
    assert muon_group["lr"] == adam_group["lr"] == 0.05  # initial LR x multiplier, every group
    assert (muon_group["momentum"], muon_group["weight_decay"]) == (0.9, 0.01)
    assert (adam_group["momentum"], adam_group["weight_decay"]) == (0.0, 0.0)  # only Muon groups are scheduled
    assert muon_param.grad is None and torch.equal(muon_param.detach(), torch.ones(2, 2))  # no update, grads dropped

    adam_param.sum().backward()
    finish_step(optimizer, None, 1.0)
    assert torch.allclose(adam_param.detach(), torch.full((2,), 0.9)) and adam_param.grad is None
    assert optimizer.param_groups[0]["lr"] == 0.1  # back to the initial LR, not compounded


def test_iter_jsonl_skips_blank_lines_reads_gz_and_names_a_bad_line(tmp_path):
    plain = tmp_path / "rows.jsonl"
    plain.write_text('{"a": 1}\n\n  \n"text"\n', encoding="utf-8")
    assert list(iter_jsonl(plain)) == [(1, {"a": 1}), (4, "text")]  # line numbers count the blank lines
    packed = tmp_path / "rows.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write('{"a": 1}\n[2]\n')
    assert list(iter_jsonl(packed)) == [(1, {"a": 1}), (2, [2])]

    class RowError(RuntimeError):
        pass
    plain.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(RowError, match=r"rows\.jsonl:2: not valid JSON \(.* at column \d+\); fix it$"):
        list(iter_jsonl(plain, RowError, hint="; fix it"))


# -----------------------------------------------------------------------------
# No side effects on import; the library raises typed errors, the entry point prints them

def test_importing_common_changes_nothing_in_the_process():
    """gc.freeze() and an atexit hook used to run on `import nanochat.common`, changing every importing program;
    the garbage-collector policy is now a call of the training scripts (nanochat.training.freeze_gc)."""
    code = ("import gc, atexit, logging, urllib.request, torch, torch.distributed; hooks = atexit._ncallbacks(); "
            "import nanochat.common; print(gc.get_freeze_count(), atexit._ncallbacks() - hooks)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]


def test_compute_init_leaves_the_allocator_alone(monkeypatch):
    """The CPU allocator setting is the training scripts' visible call (training.keep_freed_memory), no longer a
    side effect of compute_init that every CPU entry point got."""
    import ctypes
    from nanochat.common import compute_init
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: loaded.append(name))
    compute_init("cpu")
    assert loaded == []


def test_library_errors_are_typed_and_the_entry_point_prints_one_line(tmp_path, monkeypatch, capsys):
    from nanochat.cli import run
    from nanochat.common import NanochatError, DownloadError, compute_init, get_base_dir
    base_file = tmp_path / "not_a_dir"
    base_file.write_text("x")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_file))
    with pytest.raises(NanochatError, match="is a file, not a directory"):
        get_base_dir()
    with pytest.raises(NanochatError, match="--device-type=tpu is not one of cuda, cpu, mps"):
        compute_init("tpu")
    assert issubclass(DownloadError, NanochatError) and issubclass(DownloadError, RuntimeError)
    with pytest.raises(SystemExit) as excinfo:
        run(get_base_dir)
    assert excinfo.value.code == 1
    assert capsys.readouterr().err == f"error: the base dir {base_file} (NANOCHAT_BASE_DIR) is a file, not a directory\n"
