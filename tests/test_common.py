"""
The CPU allocator setting (keep_freed_memory) and the training-loop helpers in nanochat.common that base_train, chat_sft and chat_rl share: the cadence of periodic
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

from nanochat.common import is_due, finish_step, iter_jsonl
from conftest import REPO_ROOT


PAGE_FAULTS_OF_STEADY_STEPS = """
import sys, resource, torch
from nanochat.common import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
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
    buffer with 4 KiB pages); after keep_freed_memory() and a few steps the freed blocks are reused from the heap
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
