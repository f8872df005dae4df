"""
torch.compile of the training step on CPU, on tiny models: the model compiles full-graph (no graph break), loss and
every gradient equal eager, and neither further steps nor a train/eval switch recompile. Plus the one compile
decision (`--compile auto|on|off`) in nanochat.common, and an eager run that never imports the compiler.
"""

import os
import sys
import copy
import subprocess

import pytest
import torch
import torch._dynamo

from nanochat import flash_attention
from nanochat.common import should_compile, CPU_COMPILE_MIN_STEPS
from conftest import make_tiny_model, REPO_ROOT


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest.py: tiny tensors run faster on one thread


def test_should_compile_decision(capsys):
    assert should_compile("cuda", "auto", 1)
    assert not should_compile("cpu", "auto", 20)
    assert should_compile("cpu", "auto", CPU_COMPILE_MIN_STEPS)
    assert not should_compile("mps", "auto", 10**6)
    assert should_compile("cpu", "on", 1) and not should_compile("cuda", "off", 10**6)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all(line.startswith("torch.compile: ") for line in lines)
    assert "(auto: 20 steps < " in lines[1]
    with pytest.raises(ValueError, match="--compile"):
        should_compile("cpu", "maybe", 1)


@pytest.mark.slow
def test_model_compiles_fullgraph_equal_to_eager_without_recompiles():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flash_attention.set_backend_override("sdpa")
    try:
        model = make_tiny_model(128, n_layer=2, n_embd=32, n_head=2, sequence_len=16, window_pattern="SL")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)  # zero-init projections would hide gradient mismatches
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        gen = torch.Generator().manual_seed(0)
        for step in range(3):
            x = torch.randint(0, 128, (2, 16), generator=gen)
            y = torch.randint(0, 128, (2, 16), generator=gen)
            y[0, :3] = -1
            if step == 2:  # what the training loop does around an evaluation with the uncompiled module
                model.eval()
                with torch.no_grad():
                    model(x, y, loss_reduction="none")
                model.train()
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                loss = compiled(x, y)
            loss.backward()
            ref = eager(x, y)
            ref.backward()
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
                p.grad = q.grad = None
        assert not torch._dynamo.utils.counters["graph_break"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        flash_attention.set_backend_override(None)


@pytest.mark.slow
def test_a_fresh_process_compiles_without_resolving_the_backend_inside_the_graph(monkeypatch):
    """In a new process the attention backend is not chosen yet, and choosing it prints a line: GPT.init_weights
    must make that choice, or the first compiled forward would trace the print and break the full graph."""
    torch._dynamo.reset()
    monkeypatch.setattr(flash_attention, "_resolved", {})
    model = make_tiny_model(128, n_layer=1, n_embd=32, n_head=2, sequence_len=16, window_pattern="L")
    assert "cpu" in flash_attention._resolved
    x = torch.randint(0, 128, (2, 16))
    torch.compile(model, dynamic=False, fullgraph=True)(x, x).backward()


EAGER_TRAINING = """
import sys, torch
from nanochat.gpt import GPT, config_from_depth
with torch.device("meta"):
    model = GPT(config_from_depth(2, max_seq_len=32, vocab_size=256))
model.to_empty(device="cpu")
model.init_weights()
optimizer = model.setup_optimizer()
idx = torch.randint(0, 256, (2, 32))
model(idx, idx).backward()
optimizer.step()
optimizer.zero_grad(set_to_none=True)
optimizer.load_state_dict(optimizer.state_dict())
print("compiler imported:", "torch._dynamo" in sys.modules, "| sympy imported:", "sympy" in sys.modules)
"""


@pytest.mark.perf
def test_an_eager_training_step_never_imports_the_compiler():
    """Importing torch._dynamo is ~2 s of an eager run's start-up, sympy ~0.7 s. Torch's default init on the meta
    device and the tracing guard on Optimizer.zero_grad / state_dict / load_state_dict / add_param_group imported
    the compiler; torch's to_empty (empty_like of meta tensors) imported sympy."""
    out = subprocess.run([sys.executable, "-c", EAGER_TRAINING], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "compiler imported: False | sympy imported: False" in out.stdout
