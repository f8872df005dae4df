"""
Multi-node training, on one machine: two torchrun launchers (--nnodes=2, one process each, a c10d rendezvous on
127.0.0.1) train exactly as one launcher with two processes, through a checkpoint and a resume; nodes that do not
share NANOCHAT_BASE_DIR stop at start-up with one line saying so.
"""

import os
import sys
import json
import socket
import shutil
import subprocess

import pytest
import torch

from test_base_train import TINY, REPO, env_for, step_losses, val_bpbs, ckpt_dir, template_dir, train_dir  # noqa: F401

# --device-batch-size=auto: the ranks agree on one size (2 sequences of 64 make the planned 256 tokens on 2 ranks)
ARGS = [a for a in TINY if not a.startswith("--device-batch-size")] + [
    "--device-type=cpu", "--device-batch-size=auto", "--num-iterations=4", "--save-every=2", "--eval-every=2"]
TIMEOUT = 600  # a busy 2-core machine starts four Python processes per run
pytestmark = pytest.mark.slow  # subprocess trainings under torchrun


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(node_args, extra):
    return [sys.executable, "-m", "torch.distributed.run", *node_args, "-m", "scripts.base_train", *ARGS, *extra]


def run_launchers(base_dirs, extra=()):
    """One launcher per node (node i uses base_dirs[i]) joined by a c10d rendezvous; [(returncode, output)]."""
    port = free_port()
    procs = [subprocess.Popen(torchrun(["--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
                                        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                                        f"--rdzv-conf=is_host={int(rank == 0)}"], extra),
                              cwd=REPO, env=env_for(base_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, base_dir in enumerate(base_dirs)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    return [(p.returncode, output) for p, output in zip(procs, outputs)]


def run_one_launcher(base_dir, extra=()):
    cmd = torchrun(["--standalone", "--nproc-per-node=2"], extra)
    proc = subprocess.run(cmd, cwd=REPO, env=env_for(base_dir), capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout + proc.stderr


def checkpoint_tensors(directory, step):
    d = ckpt_dir(directory)
    return [torch.load(d / f"model_{step:06d}.pt"), torch.load(d / f"optim_{step:06d}.pt")]


def assert_equal_states(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_states(x, y)
    else:
        assert a == b


def test_two_launchers_train_as_one_launcher_with_two_processes(train_dir, tmp_path):
    one_dir = tmp_path / "one_launcher"
    shutil.copytree(train_dir, one_dir)
    code, one = run_one_launcher(one_dir)
    assert code == 0, one[-4000:]
    (code0, node0), (code1, node1) = run_launchers([train_dir, train_dir])  # one shared base dir
    assert code0 == 0 and code1 == 0, node0[-4000:] + node1[-4000:]
    assert "Device batch size: auto -> 2" in node0 and "gradient accumulation steps: 1" in node0
    assert step_losses(node0) == step_losses(one) and sorted(step_losses(one)) == [0, 1, 2, 3]
    assert val_bpbs(node0) == val_bpbs(one) and sorted(val_bpbs(one)) == [0, 2, 4]
    for step in (2, 4):  # the model and the optimizer state, bit for bit
        assert_equal_states(checkpoint_tensors(train_dir, step), checkpoint_tensors(one_dir, step))
    meta = json.loads((ckpt_dir(train_dir) / "meta_000004.json").read_text())
    assert meta["world_size"] == 2 and meta["device_batch_size"] == 2

    # resume the two-launcher run from step 2, again on two launchers: the last two steps come out the same
    (code0, node0), (code1, node1) = run_launchers([train_dir, train_dir], ["--resume-from-step=2"])
    assert code0 == 0 and code1 == 0, node0[-4000:] + node1[-4000:]
    resumed = step_losses(node0)
    assert sorted(resumed) == [2, 3] and all(resumed[s] == step_losses(one)[s] for s in (2, 3))
    assert val_bpbs(node0)[4] == val_bpbs(one)[4]
    assert_equal_states(checkpoint_tensors(train_dir, 4), checkpoint_tensors(one_dir, 4))


def test_nodes_without_a_shared_base_dir_stop_with_one_line(train_dir, tmp_path):
    other_dir = tmp_path / "node1_base"
    shutil.copytree(train_dir, other_dir)  # same data and tokenizer, but not the same filesystem
    results = run_launchers([train_dir, other_dir])
    for code, output in results:
        assert code != 0, output[-4000:]
        errors = [line for line in output.splitlines() if "error: rank(s) 1 cannot see the files rank 0 writes" in line]
        assert errors and "a multi-node run needs NANOCHAT_BASE_DIR on a filesystem shared by every node" in errors[0]
        assert "Starting training" not in output and "terminate called" not in output  # no rank aborts
    assert not ckpt_dir(train_dir).exists() and not ckpt_dir(other_dir).exists()
    assert not [n for d in (train_dir, other_dir) for n in os.listdir(d) if n.startswith(".shared-check-")]
