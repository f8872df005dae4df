"""
What a GPU user's first hour depends on, tested on CPU: the GPU set-up installs the `kernels` package (FA3), the
--device-batch-size=auto search (out-of-memory simulated from here), peak FLOPs for MFU and their override, the loss
kernel chosen per device, and dev/gpu_check's plumbing (--dry-run). The tests at the end need a CUDA device; on one,
python -m dev.gpu_check runs them.
"""

import os
import sys
import json
import shutil
import subprocess
import types
import copy
import argparse

import pytest
import torch

from nanochat import auto_batch, common, gpt
from nanochat.gpt import GPTConfig, config_from_depth
from conftest import REPO_ROOT, make_tiny_model
from test_base_train import TINY, run_train, ckpt_dir, template_dir, train_dir  # noqa: F401 (fixtures)
from test_chat_sft import chat_env  # noqa: F401 (fixture)
from test_chat_rl import rl_env  # noqa: F401 (fixture)

CUDA = torch.cuda.is_available()

# -----------------------------------------------------------------------------
# 1. The GPU install has FA3

FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in interpreter: `-m venv DIR` makes a venv whose python is this script; every other call is logged
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && : > "$3/bin/activate" && exit 0
fi
echo "$*" >> "$PIP_LOG"
"""


@pytest.mark.parametrize("gpu", [True, False])
def test_gpu_setup_installs_the_kernels_package(tmp_path, gpu):
    """dev/setup_env.sh (sourced by runs/speedrun.sh) installs requirements-gpu.lock, which pins `kernels` (what
    nanochat.flash_attention loads FA3 with), where nvidia-smi lists a GPU, and only there."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "pip.log"
    (repo / "dev").mkdir(parents=True)
    bin_dir.mkdir()
    for name in ("dev/setup_env.sh", "requirements.lock", "requirements-gpu.lock", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, repo / name)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    nvidia_smi = ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"' if gpu else
                  "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9")
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python3"), PIP_LOG=str(log))
    out = subprocess.run(["bash", "-c", "source dev/setup_env.sh"], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    assert f"-m pip install -q -r {repo}/requirements.lock" in calls
    assert (f"-m pip install -q -r {repo}/requirements-gpu.lock" in calls) == gpu, calls
    pins = [line for line in (REPO_ROOT / "requirements-gpu.lock").read_text().splitlines() if not line.startswith("#")]
    assert any(line.startswith("kernels==") for line in pins) and all("==" in line and "/" not in line for line in pins)
    assert '"kernels' in (REPO_ROOT / "pyproject.toml").read_text().split("gpu = [")[1].split("]")[0]
    assert "from kernels import get_kernel" in (REPO_ROOT / "nanochat" / "flash_attention.py").read_text()

# -----------------------------------------------------------------------------
# 2. --device-batch-size=auto

TINY_CONFIG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L")


def test_candidate_sizes_split_the_planned_sequences_evenly():
    assert auto_batch.candidate_sizes(512) == [64, 32, 16, 8, 4, 2, 1]
    assert auto_batch.candidate_sizes(12) == [4, 2, 1]
    assert auto_batch.candidate_sizes(3) == [1] and auto_batch.candidate_sizes(0) == [1]


def test_flag_accepts_auto_or_a_positive_integer():
    assert auto_batch.positive_int_or_auto("auto") == "auto" and auto_batch.positive_int_or_auto("16") == 16
    parser = argparse.ArgumentParser()
    parser.add_argument("--device-batch-size", type=auto_batch.positive_int_or_auto)
    for bad in ("0", "-2", "1.5", "big", "nan"):
        with pytest.raises(SystemExit) as excinfo:
            parser.parse_args([f"--device-batch-size={bad}"])
        assert excinfo.value.code == 2  # argparse's one error line, as for every numeric flag


def simulate_out_of_memory(monkeypatch, runs_out):
    """GPT.forward raises torch.OutOfMemoryError when runs_out(batch size, optimizer steps so far) says so."""
    calls, forward = [], gpt.GPT.forward
    steps = {}

    def forward_with_a_memory_limit(self, idx, targets=None, **kwargs):
        size = idx.size(0)
        calls.append(size)
        if runs_out(size, steps.get(size, 0)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        steps[size] = steps.get(size, 0) + 1
        return forward(self, idx, targets, **kwargs)
    monkeypatch.setattr(gpt.GPT, "forward", forward_with_a_memory_limit)
    return calls


def test_search_steps_down_past_out_of_memory(monkeypatch, capsys):
    """16 runs out at once; 8 trains one step but runs out in the second, once the optimizer state exists; 4 fits."""
    calls = simulate_out_of_memory(monkeypatch, lambda size, done: size > 8 or (size == 8 and done == 1))
    assert auto_batch.search_device_batch_size(TINY_CONFIG, torch.device("cpu"), 16, [16, 8, 4, 2, 1]) == 4
    assert calls == [16, 8, 8, 4, 4]  # two steps at the size that fits
    line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Device batch size")]
    assert len(line) == 1 and line[0].startswith("Device batch size: auto -> 4 (the largest of [16, 8, 4, 2, 1]")
    assert "peak " in line[0] and line[0].endswith("; out of memory at 16, 8)")


def test_search_fails_with_one_line_when_nothing_fits(monkeypatch):
    simulate_out_of_memory(monkeypatch, lambda size, done: True)
    with pytest.raises(common.NanochatError, match=r"^--device-batch-size=auto: even 1 sequence of 16 tokens"):
        auto_batch.search_device_batch_size(TINY_CONFIG, torch.device("cpu"), 16, [2, 1])


def test_auto_on_cpu_picks_by_available_ram(monkeypatch, capsys):
    config = config_from_depth(4, max_seq_len=512, vocab_size=32768, head_dim=64)
    with torch.device("meta"):
        weights = 16 * sum(p.numel() for p in gpt.GPT(config).parameters())
    sequence = 512 * (8 * 32768 + 4 * (128 * 256 + 8 * 4 * 512))  # the documented estimate

    def choice(available, local_ranks=1):
        monkeypatch.setattr(auto_batch.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
        return auto_batch.auto_device_batch_size(config, torch.device("cpu"), 512, 64)
    assert choice(weights + 4.5 * sequence) == 4
    assert choice(2 * (weights + 4.5 * sequence), local_ranks=2) == 4  # ranks on one machine share its RAM
    assert choice(weights + 100 * sequence) == 64
    assert choice(weights) == 1  # never less than one sequence
    assert "Device batch size: auto -> 4 (the largest of [64, 32, 16, 8, 4, 2, 1] that fits in cpu memory" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_base_train_auto_keeps_the_planned_total_batch_and_reports_mfu(train_dir):
    """auto on CPU (plenty of RAM for d2): 4 sequences of 64 per micro-step make the planned 256 tokens in one
    micro-step; the checkpoint records the size used. NANOCHAT_PEAK_FLOPS gives an MFU on CPU too."""
    args = [a for a in TINY if not a.startswith("--device-batch-size")]
    proc = run_train(train_dir, args + ["--device-type=cpu", "--device-batch-size=auto", "--num-iterations=2",
                                        "--eval-every=-1"],
                     NANOCHAT_PEAK_FLOPS="2e12")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Device batch size: auto -> 4 (the largest of [4, 2, 1]" in proc.stdout
    assert "Total batch size 256 => gradient accumulation steps: 1" in proc.stdout
    assert "Peak FLOPS (BF16): 2.000e+12 for 'cpu' (from NANOCHAT_PEAK_FLOPS)" in proc.stdout
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and all("| mfu: n/a |" not in line and "| mfu: " in line for line in steps)
    meta = json.loads((ckpt_dir(train_dir) / "meta_000002.json").read_text())
    assert meta["device_batch_size"] == 4 and meta["user_config"]["device_batch_size"] == "auto"

def test_chat_sft_auto_splits_the_inherited_total_batch(chat_env, capsys):
    """The base run's 2 x 64 tokens per step: auto takes both rows in one micro-step."""
    from scripts import chat_sft
    result = chat_sft.main(["--device-type=cpu", "--device-batch-size=auto", "--num-iterations=1", "--eval-tokens=128",
                            "--chatcore-every=-1", "--dry-run=1", "--simple-spelling-size=20", "--spelling-bee-size=20"])
    out = capsys.readouterr().out
    assert "Device batch size: auto -> 2 (the largest of [2, 1]" in out and "gradient accumulation steps: 1" in out
    assert result["step"] == 1


def test_chat_rl_auto_divides_the_samples_per_prompt(rl_env, capsys):
    from scripts import chat_rl
    result = chat_rl.main(["--device-type=cpu", "--device-batch-size=auto", "--num-samples=4", "--num-steps=1",
                           "--examples-per-step=1", "--max-new-tokens=4", "--eval-every=1", "--eval-examples=1"])
    assert "Device batch size: auto -> 4 (the largest of [4, 2, 1]" in capsys.readouterr().out
    assert result["num_steps"] == 1 and len(result["pass_at_k"]) == 4  # pass@1..device batch

# -----------------------------------------------------------------------------
# 3. MFU for any GPU

@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12), ("NVIDIA GH200 480GB", 989.4e12), ("NVIDIA B200", 2.25e15),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A10G", None), ("NVIDIA L4", 121e12), ("NVIDIA L40", 181.05e12), ("NVIDIA L40S", 362.05e12),
    ("NVIDIA RTX A6000", 154.8e12), ("NVIDIA RTX 6000 Ada Generation", 364.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("NVIDIA GeForce RTX 3090 Ti", 80e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 4070", 58.3e12), ("NVIDIA GeForce RTX 5090", 209.5e12), ("AMD Instinct MI300X", 1.3074e15),
    ("cpu", None),
])
def test_peak_flops_table(monkeypatch, capsys, name, flops):
    monkeypatch.delenv("NANOCHAT_PEAK_FLOPS", raising=False)
    assert common.get_peak_flops(name) == flops
    out = capsys.readouterr().out
    assert ("datasheet figures, dense bf16" in out) if flops else ("MFU is reported as n/a" in out and
                                                                   "NANOCHAT_PEAK_FLOPS" in out)


def test_peak_flops_override(monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", "1.5e14")
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 1.5e14 and common.get_peak_flops("cpu") == 1.5e14
    assert capsys.readouterr().out.count("(from NANOCHAT_PEAK_FLOPS)") == 2
    for bad in ("fast", "0", "-1e12", "inf"):
        monkeypatch.setenv("NANOCHAT_PEAK_FLOPS", bad)
        with pytest.raises(common.NanochatError, match=rf"^NANOCHAT_PEAK_FLOPS='{bad}' must be a positive number"):
            common.get_peak_flops("cpu")

# -----------------------------------------------------------------------------
# 5. One loss, its kernel chosen per device

def test_loss_kernel_is_a_device_decision_printed_once(monkeypatch, capsys):
    monkeypatch.setattr(common, "_loss_kernels", {})
    assert common.choose_loss_kernel("cpu") == "fused" and common.choose_loss_kernel("cuda") == "cross_entropy"
    assert common.choose_loss_kernel("cpu") == "fused"
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Loss kernel: fused (measured fastest on CPU): {common.LOSS_KERNELS['fused']}",
                     f"Loss kernel: cross_entropy (the simplest on cuda): {common.LOSS_KERNELS['cross_entropy']}"]
    assert make_tiny_model(64).loss_kernel == "fused"  # a model takes its device's kernel when it is initialized


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_both_loss_kernels_give_one_loss_and_one_gradient(monkeypatch, reduction):
    monkeypatch.setattr(gpt, "LOSS_CHUNK_TOKENS", 7)  # several chunks, an uneven last one
    fused = make_tiny_model(300)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    plain = copy.deepcopy(fused)
    plain.loss_kernel = "cross_entropy"
    idx, targets = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    targets[0, :5] = -1
    fused_calls, fused_apply = [], gpt.SoftcapCrossEntropy.apply
    monkeypatch.setattr(gpt.SoftcapCrossEntropy, "apply", lambda *args: fused_calls.append(1) or fused_apply(*args))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss_plain = plain(idx, targets, loss_reduction=reduction)
    assert max(saved) <= plain.lm_head.weight.numel()  # its logits are recomputed in backward, never kept
    assert not fused_calls
    loss_fused = fused(idx, targets, loss_reduction=reduction)
    assert fused_calls == [1]
    torch.testing.assert_close(loss_fused, loss_plain)
    (3 * loss_fused).backward()
    (3 * loss_plain).backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)  # backout_lambda: ~1e-6 itself


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["cross_entropy", "fused"])
def test_each_loss_kernel_compiles_full_graph_like_eager(monkeypatch, kernel):
    """cross_entropy (what CUDA runs by default): the checkpointed F.cross_entropy chunks inside the full-graph compiled
    model. Both with a padded vocab (100 -> 128 rows of lm_head): compiled, the fused kernel once lost the x4 of its
    lm_head gradient when the vocab was padded."""
    import torch._dynamo
    if kernel == "cross_entropy":
        def fused_kernel(*args):
            raise AssertionError("the fused kernel ran")
        monkeypatch.setattr(gpt.SoftcapCrossEntropy, "apply", fused_kernel)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_tiny_model(100, n_layer=1, n_embd=32, n_head=2, sequence_len=16, window_pattern="L")
    model.loss_kernel = kernel
    eager = copy.deepcopy(model)
    x = torch.randint(0, 100, (2, 16))
    loss = torch.compile(model, dynamic=False, fullgraph=True)(x, x)
    loss.backward()
    ref = eager(x, x)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]

# -----------------------------------------------------------------------------
# 6. The prepared GPU check

@pytest.mark.slow
def test_gpu_check_dry_run_prints_one_table():
    out = subprocess.run([sys.executable, "-m", "dev.gpu_check", "--dry-run"], cwd=REPO_ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| check |"):].strip().splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert all(len(row) == 6 for row in rows) and not any("failed" in row[2] for row in rows), table
    checks = [row[0] for row in rows]
    assert checks.count("loss kernel") == 4 and checks.count("decode") == 2 and checks.count("auto batch") == 1
    assert checks.count("train") == 8 and checks[0] == "tests"
    assert rows[0][2].endswith("tests collected") or " tests collected in " in rows[0][2], rows[0]
    trained = [row for row in rows if row[0] == "train" and row[2].endswith("tok/s")]
    assert [row[1].split(",")[1].strip() for row in trained] == ["sdpa (window L)"] * 2  # d1 and d2, no fp8 on CPU
    assert all(row[2].endswith(("ms forward + backward", "tok/s")) for row in rows if row[0] in ("loss kernel", "decode"))
    assert [row[2] for row in rows if row[0] == "auto batch"] == ["auto -> 4 sequences (no fp8)"]

# -----------------------------------------------------------------------------
# On a CUDA device (python -m dev.gpu_check runs these there)

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_search_fits_under_a_memory_cap():
    """A real out-of-memory error: with the process capped at 3 GiB a d4 model at 1024 tokens a sequence cannot take
    64 sequences; the size found trains within the cap."""
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(3 * 2**30 / total, device)
    try:
        config = config_from_depth(4, max_seq_len=1024, vocab_size=32768)
        chosen = auto_batch.search_device_batch_size(config, device, 1024, auto_batch.LADDER)
        assert 1 <= chosen < 64
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_loss_kernels_agree_on_cuda():
    """Both kernels, compiled in the compute dtype of this GPU, give one loss and one lm_head gradient."""
    config = GPTConfig(sequence_len=64, vocab_size=1000, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    with torch.device("meta"):
        fused = gpt.GPT(config)
    fused.to_empty(device="cuda")
    fused.init_weights()
    plain = copy.deepcopy(fused)
    fused.loss_kernel, plain.loss_kernel = "fused", "cross_entropy"
    x = torch.randint(0, 1000, (4, 64), device="cuda")
    losses = []
    for model in (fused, plain):
        loss = torch.compile(model, dynamic=False, fullgraph=True)(x, x)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[1]
    a, b = fused.lm_head.weight.grad.float(), plain.lm_head.weight.grad.float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2
