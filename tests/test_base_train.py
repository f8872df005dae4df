"""
scripts/base_train end to end on a tiny model (CPU, subprocesses): bit-exact resume, 2 gloo processes == 1 process
with gradient accumulation, SIGTERM checkpoint, NaN stop, bad-input messages.

The data is built so that the exact batches are predictable: every document is the same number of tokens (words
that are single tokens), longer than a row, one document per parquet row group. The best-fit packer then crops
documents in arrival order, so 1 process with 2 micro-steps sees exactly the documents 2 ranks see together.
"""

import os
import json
import random
import pathlib
import subprocess

import pytest
import torch

from conftest import script_cmd, terminate_after_line

REPO = pathlib.Path(__file__).resolve().parents[1]
T = 64                 # --max-seq-len
DOC_WORDS = 80         # every document: BOS + 80 single-token words (> T + 1, so each row is one cropped document)
NUM_TRAIN_DOCS = 200
NUM_VAL_DOCS = 8
# d2, width 64, 2 heads; 2 rows of 64 tokens per micro-step; 256 tokens per step (= 2 micro-steps on 1 process)
TINY = ["--depth=2", "--aspect-ratio=32", "--head-dim=32", f"--max-seq-len={T}", "--device-batch-size=2",
        "--total-batch-size=256", "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1",
        "--warmup-steps=0", "--window-pattern=SL"]


def build_base_dir(base_dir, tokenizer):
    """Tokenizer + token_bytes + one train shard (1 doc per row group) + a val shard + manifest, dataset 'local'."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from nanochat.tokenizer import compute_token_bytes
    tok_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tok_dir)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tok_dir, "token_bytes.pt"))
    words = [s for s in (tokenizer.decode([t]) for t in range(tokenizer.get_vocab_size()))
             if len(s) > 2 and s[0] == " " and s[1:].isalpha() and s[1:].islower() and len(tokenizer.encode(s)) == 1]
    assert len(words) >= 20, "the tiny tokenizer should have plenty of single-token words"
    rng = random.Random(0)
    successor = {w: rng.sample(words, 2) for w in words}  # a learnable Markov chain over words

    def document():
        w, out = rng.choice(words), []
        for _ in range(DOC_WORDS):
            out.append(w)
            w = rng.choice(successor[w]) if rng.random() < 0.9 else rng.choice(words)
        text = "".join(out)
        assert len(tokenizer.encode(text)) == DOC_WORDS, "words must stay single tokens when concatenated"
        return text

    data_dir = os.path.join(base_dir, "base_data_local")
    os.makedirs(data_dir)
    train = [document() for _ in range(NUM_TRAIN_DOCS)]
    val = [document() for _ in range(NUM_VAL_DOCS)]
    pq.write_table(pa.Table.from_pydict({"text": train}), os.path.join(data_dir, "shard_00000.parquet"), row_group_size=1)
    pq.write_table(pa.Table.from_pydict({"text": val}), os.path.join(data_dir, "shard_00001.parquet"), row_group_size=1)
    with open(os.path.join(data_dir, "manifest.json"), "w") as f:
        json.dump({"dataset": "local", "train": ["shard_00000.parquet"], "val": "shard_00001.parquet"}, f)


@pytest.fixture(scope="module")
def template_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("base_train_template")
    build_base_dir(str(path), tiny_tokenizer)
    return path


@pytest.fixture
def train_dir(template_dir, tmp_path):
    """A fresh copy of the template base dir per test (checkpoints never leak between tests)."""
    import shutil
    path = tmp_path / "base"
    shutil.copytree(template_dir, path)
    return path


def env_for(base_dir, **extra):
    env = dict(os.environ)
    env.update(NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATASET="local", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO), NANOCHAT_DTYPE="float32")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def base_train_cmd(args, nproc=1):
    return script_cmd("scripts.base_train", args, nproc)


def run_train(base_dir, args, nproc=1, timeout=240, **env_extra):
    proc = subprocess.run(base_train_cmd(args, nproc), cwd=REPO, env=env_for(base_dir, **env_extra),
                          capture_output=True, text=True, timeout=timeout)
    return proc


def lines_with(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def step_losses(text):
    """{step: 'loss: x.xxxxxx'} from the per-step lines."""
    out = {}
    for line in lines_with(text, "step "):
        parts = line.split(" | ")
        out[int(parts[0].split()[1].split("/")[0])] = parts[1]
    return out


def val_bpbs(text):
    """{step: bpb} from the 'Step 00006 | Validation bpb: 2.345678 ± 0.012345 (512 tokens)' lines."""
    return {int(l.split()[1]): float(l.split("Validation bpb: ")[1].split()[0])
            for l in lines_with(text, "Step ") if "Validation bpb" in l}


def ckpt_dir(base_dir, tag="d2"):
    return pathlib.Path(base_dir) / "base_checkpoints" / tag


# -----------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_is_bit_exact(train_dir):
    args = TINY + ["--num-iterations=6", "--save-every=3", "--eval-every=3"]
    full = run_train(train_dir, args)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    d = ckpt_dir(train_dir)
    assert (d / "complete_000003.json").exists() and (d / "complete_000006.json").exists()
    full_model = torch.load(d / "model_000006.pt")
    full_optim = torch.load(d / "optim_000006.pt")
    summary = json.loads((d / "summary.json").read_text())
    assert summary["num_iterations"] == 6 and summary["tokens_trained"] == 6 * 256 and summary["val_bpb"] is not None

    resumed = run_train(train_dir, args + ["--resume-from-step=3"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a, b = step_losses(full.stdout), step_losses(resumed.stdout)
    assert sorted(b) == [3, 4, 5]
    assert all(a[s] == b[s] for s in (3, 4, 5)), (a, b)
    assert val_bpbs(full.stdout)[6] == val_bpbs(resumed.stdout)[6]
    resumed_model = torch.load(d / "model_000006.pt")
    for k in full_model:
        assert torch.equal(full_model[k], resumed_model[k]), k
    resumed_optim = torch.load(d / "optim_000006.pt")
    for k, state in full_optim["state"].items():
        for name, value in state.items():
            other = resumed_optim["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    # the loss fell and the meta carries the loop state
    bpb = val_bpbs(full.stdout)
    assert bpb[6] < bpb[0]
    meta = json.loads((d / "meta_000006.json").read_text())
    assert meta["world_size"] == 1 and meta["loop_state"]["history"]["val"][-1]["step"] == 6


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(train_dir, tmp_path):
    """Also resumes each run's step-2 checkpoint on the other number of processes (2 -> 1, 1 -> 2)."""
    import shutil
    single_dir = tmp_path / "single"
    shutil.copytree(train_dir, single_dir)
    args = TINY + ["--num-iterations=4", "--eval-every=2", "--save-every=2"]
    # 2 ranks x 1 micro-step and 1 process x 2 micro-steps: same 256 tokens per step
    procs = [subprocess.Popen(base_train_cmd(args, nproc), cwd=REPO, env=env_for(path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for nproc, path in ((2, train_dir), (1, single_dir))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    two, one = outs[0][0], outs[1][0]
    assert "gradient accumulation steps: 1" in two and "gradient accumulation steps: 2" in one
    bpb2, bpb1 = val_bpbs(two), val_bpbs(one)
    assert sorted(bpb2) == sorted(bpb1) == [0, 2, 4]
    for s in bpb1:
        assert abs(bpb1[s] - bpb2[s]) <= 1e-4 * bpb1[s], (s, bpb1, bpb2)
    assert bpb1[4] < bpb1[0]
    m2 = torch.load(ckpt_dir(train_dir) / "model_000004.pt")
    m1 = torch.load(ckpt_dir(single_dir) / "model_000004.pt")
    for k in m1:
        assert torch.isfinite(m2[k]).all()
        if m1[k].numel() < 1024:
            # the scalar lambdas: AdamW turns float-rounding-sized differences of near-zero grads into LR-sized
            # steps (the same happens between 1 process with 2x2 rows and 1 process with 1x4 rows), skip them
            continue
        scale = m1[k].abs().max().item()
        assert (m2[k] - m1[k]).abs().max().item() <= 1e-2 * scale + 1e-5, k
    # N -> M: the same total batch (gradient accumulation absorbs the change), the schedules from step 2 on, the
    # optimizer state and the data stream resharded; the run finishes and keeps learning like the uninterrupted one
    procs = [subprocess.Popen(base_train_cmd(args + ["--resume-from-step=2"], nproc), cwd=REPO, env=env_for(path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for nproc, path in ((1, train_dir), (2, single_dir))]
    resumed = [p.communicate(timeout=300) for p in procs]
    for p, (out, err), (old_world, new_world, accum) in zip(procs, resumed, ((2, 1, 2), (1, 2, 1))):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
        assert f"saved by {old_world} process(es), now {new_world}" in out, out[-3000:]
        assert f"gradient accumulation steps: {accum}" in out
        assert sorted(step_losses(out)) == [2, 3]
        assert abs(val_bpbs(out)[4] - bpb1[4]) <= 0.02 * bpb1[4], (val_bpbs(out), bpb1)
    assert (ckpt_dir(train_dir) / "optim_000004.pt").exists()  # both ranks' optimizer state, consolidated
    assert json.loads((ckpt_dir(train_dir) / "meta_000004.json").read_text())["world_size"] == 1
    assert json.loads((ckpt_dir(single_dir) / "meta_000004.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_zero(train_dir):
    proc = subprocess.Popen(base_train_cmd(TINY + ["--num-iterations=100000", "--eval-every=-1"]), cwd=REPO,
                            env=env_for(train_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = terminate_after_line(proc, "step 00002/")
    assert proc.returncode == 0, output[-3000:]
    assert "Stopped by signal at step" in output
    step = int(output.split("Stopped by signal at step ")[1].split(";")[0])
    assert step >= 3
    from nanochat.checkpoint_manager import find_last_step
    assert find_last_step(str(ckpt_dir(train_dir))) == step
    meta = json.loads((ckpt_dir(train_dir) / f"meta_{step:06d}.json").read_text())
    assert meta["step"] == step and meta["dataloader_state_dict"] is not None
    assert not (ckpt_dir(train_dir) / "summary.json").exists()  # a preempted run is not a finished run


@pytest.mark.slow
def test_divergence_never_saves_a_non_finite_checkpoint(train_dir):
    """A real divergence (every LR x1e12): the update of step 1 makes the weights non-finite while every logged loss
    is finite; no checkpoint with non-finite weights or optimizer state is written, and one line names the last good
    step."""
    args = TINY + ["--num-iterations=10", "--save-every=1", "--eval-every=-1", "--embedding-lr=3e11",
                   "--unembedding-lr=8e9", "--matrix-lr=2e10", "--scalar-lr=5e11"]
    proc = run_train(train_dir, args)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = lines_with(proc.stderr, "error:")
    assert len(errors) == 1 and "non-finite" in errors[0], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    d = ckpt_dir(train_dir)
    steps = sorted(int(n[len("complete_"):-len(".json")]) for n in os.listdir(d) if n.startswith("complete_"))

    def finite(obj):
        if isinstance(obj, torch.Tensor):
            return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        if isinstance(obj, dict):
            return all(finite(v) for v in obj.values())
        return all(finite(v) for v in obj) if isinstance(obj, (list, tuple)) else True
    for step in steps:
        assert finite(torch.load(d / f"model_{step:06d}.pt")), step
        assert finite(torch.load(d / f"optim_{step:06d}.pt")), step
    assert steps and f"last good checkpoint is step {steps[-1]}" in errors[0], errors[0]
    assert not (d / "summary.json").exists()


@pytest.mark.slow
def test_keep_last_prunes_periodic_checkpoints(train_dir):
    proc = run_train(train_dir, TINY + ["--num-iterations=6", "--save-every=1", "--eval-every=-1", "--keep-last=2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from nanochat.checkpoint_manager import complete_steps
    d = ckpt_dir(train_dir)
    assert complete_steps(str(d)) == [5, 6]
    assert not any("000004" in n or "000001" in n for n in os.listdir(d))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_unreadable_resume_checkpoint_is_one_clear_line(train_dir, damage):
    args = TINY + ["--num-iterations=4", "--save-every=2", "--eval-every=-1"]
    assert run_train(train_dir, args).returncode == 0
    model_file = ckpt_dir(train_dir) / "model_000004.pt"
    if damage == "truncated":
        model_file.write_bytes(model_file.read_bytes()[:1000])
    else:  # complete, but with a NaN weight: never "the last good checkpoint"
        state = torch.load(model_file)
        state["transformer.wte.weight"][3, 5] = float("nan")
        torch.save(state, model_file)
    proc = run_train(train_dir, args + ["--resume-from-step=4", "--num-iterations=6"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --resume-from-step=4") and str(model_file) in last and "previous complete step is 2" in last
    assert "step 00004/" not in proc.stdout and "last good checkpoint" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_full_disk_during_a_save_is_one_line_and_leaves_nothing(train_dir):
    """A file size limit makes every write past 64 KiB fail the way a full disk does (EFBIG instead of ENOSPC)."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    proc = subprocess.run(base_train_cmd(TINY + ["--num-iterations=4", "--save-every=2", "--eval-every=-1"]), cwd=REPO,
                          env=env_for(train_dir), capture_output=True, text=True, timeout=240,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = lines_with(proc.stderr, "error:")
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-3000:]
    assert "could not save the checkpoint of step 2" in errors[0] and "File too large" in errors[0], errors[0]
    assert os.listdir(ckpt_dir(train_dir)) == []  # no temp file, no model without its marker


@pytest.mark.parametrize("flags,needle", [
    (["--depth=0"], "argument --depth: must be an integer in [1, inf), got 0"),
    (["--total-batch-size=1000"], "--total-batch-size=1000"),
    (["--resume-from-step=5"], "--resume-from-step=5"),
    (["--fp8", "--device-type=cpu"], "--fp8"),
    (["--window-pattern=SXL"], "--window-pattern"),
    (["--num-iterations=-1", "--target-param-data-ratio=-1"], "horizon"),
    (["--device-type=tpu"], "--device-type=tpu"),
    (["--head-dim=7"], "--head-dim=7"),
    (["--model-tag=../../x"], "--model-tag="),
    (["--keep-last=0"], "argument --keep-last: must be an integer in [1, inf) or -1, got 0"),
])
def test_bad_input_is_one_clear_line(train_dir, monkeypatch, capsys, flags, needle):
    # in-process: these checks run before any heavy work, so no subprocess (and no torch import) is needed
    from nanochat.cli import run
    from scripts import base_train
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(train_dir))
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    with pytest.raises(SystemExit) as exc:  # through cli.run, as `python -m scripts.base_train` runs main
        run(lambda: base_train.main(TINY + ["--num-iterations=2"] + flags))
    out, err = capsys.readouterr()
    # a flag out of its range is argparse's "<prog>: error: ..." line (exit 2), any other bad input run's "error: ..."
    # line (exit 1); either way the only error line, and the last line on stderr
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exc.value.code in (1, 2) and errors == [err.strip().splitlines()[-1]], err
    message = errors[0] if exc.value.code == 1 else errors[0].split(": ", 1)[1]
    assert message.startswith("error:") and needle in message, message
    assert "step 00000" not in out  # stopped before any training
    assert not ckpt_dir(train_dir).exists()


def test_base_dir_that_is_a_file_is_one_clear_line(tmp_path):
    base_file = tmp_path / "not_a_dir"
    base_file.write_text("x")
    proc = run_train(base_file, TINY + ["--num-iterations=2"], timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(base_file) in last and "not a directory" in last


def test_cli_bad_input_exits_nonzero(train_dir):
    proc = run_train(train_dir, TINY + ["--depth=0"], timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.endswith("error: argument --depth: must be an integer in [1, inf), got 0")
    assert "Traceback" not in proc.stderr


def test_schedules():
    from scripts.base_train import get_lr_multiplier, get_muon_momentum, get_weight_decay, warmup_iters_for, build_parser
    N = 100
    assert get_lr_multiplier(0, N, 10, 0.5, 0.0) == 0.1 and get_lr_multiplier(9, N, 10, 0.5, 0.0) == 1.0
    assert get_lr_multiplier(50, N, 10, 0.5, 0.0) == 1.0
    assert abs(get_lr_multiplier(99, N, 10, 0.5, 0.0) - 1 / 50) < 1e-12
    assert abs(get_lr_multiplier(99, N, 0, 0.5, 0.05) - (1 / 50 + (49 / 50) * 0.05)) < 1e-12
    assert get_muon_momentum(0, 10000, 0.65) == 0.85 and abs(get_muon_momentum(400, 10000, 0.65) - 0.97) < 1e-12
    assert abs(get_muon_momentum(10000, 10000, 0.65) - 0.90) < 1e-12
    assert get_weight_decay(0, N, 0.2) == 0.2 and abs(get_weight_decay(N, N, 0.2)) < 1e-12
    args = build_parser().parse_args([])
    assert warmup_iters_for(args, 10000) == 40
    assert warmup_iters_for(args, 20) == 20 - 13  # never runs into the warmdown of short runs
    args = build_parser().parse_args(["--warmup-ratio=0.1"])
    assert warmup_iters_for(args, 1000) == 100


@pytest.mark.parametrize("depth,batch,wd,steps", [
    (12, 2 ** 19, 0.28, 2520), (20, 2 ** 20, 0.1002, 4980), (24, 2 ** 20, 0.0597, 8352), (26, 2 ** 20, 0.0475, 10510),
])
def test_head_recipe_plan_matches_spec(depth, batch, wd, steps):
    """Auto batch size, LR/WD scaling and horizon at HEAD defaults (vocab 32768, T=2048, 8 GPUs x 16 x 2048)."""
    from scripts.base_train import training_plan, build_parser
    args = build_parser().parse_args([f"--depth={depth}"])
    plan = training_plan(args, 32768, 16 * 2048 * 8, print0=lambda *a, **k: None)
    assert plan.total_batch_size == batch
    assert abs(plan.weight_decay_scaled - wd) < 5e-4
    assert abs(plan.num_iterations - steps) <= 1  # the spec's figures are hand-computed
    assert abs(plan.batch_lr_scale - (batch / 2 ** 19) ** 0.5) < 1e-12


@pytest.mark.slow
def test_compile_on_trains_like_eager(train_dir):
    # --compile=on compiles the model (fullgraph) and the optimizer math; the losses match eager's closely
    common = TINY + ["--num-iterations=3", "--eval-every=-1"]
    eager = run_train(train_dir, common + ["--compile=off", "--model-tag=eager"])
    compiled = run_train(train_dir, common + ["--compile=on", "--model-tag=compiled"], timeout=600)
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert "torch.compile: off (--compile=off)" in eager.stdout
    assert "torch.compile: on (--compile=on)" in compiled.stdout
    eager_losses, compiled_losses = step_losses(eager.stdout), step_losses(compiled.stdout)
    assert sorted(eager_losses) == sorted(compiled_losses) == [0, 1, 2]
    for step in eager_losses:
        assert abs(float(eager_losses[step].split()[1]) - float(compiled_losses[step].split()[1])) < 1e-3


@pytest.mark.slow
def test_compile_auto_is_eager_for_a_short_cpu_run(train_dir):
    proc = run_train(train_dir, TINY + ["--num-iterations=2", "--eval-every=-1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.compile: off (auto: 2 steps < 200, the CPU warm-up break-even)" in proc.stdout


def test_core_failing_in_training_is_reported_with_its_type(monkeypatch, capsys):
    """Only the expected cause, no eval bundle to be had (offline), is skipped quietly; any other CORE failure is
    reported with its error type (never passed off as 'skipped'). Training goes on either way."""
    from scripts import base_train
    from nanochat.eval_bundle import BundleError, BundleUnavailable
    args = base_train.build_parser().parse_args([])
    model = torch.nn.Linear(2, 2)

    def raising(error):
        def evaluate_core(*args, **kwargs):
            raise error
        return evaluate_core
    monkeypatch.setattr(base_train, "evaluate_core", raising(BundleUnavailable("CORE eval bundle not found (offline)")))
    assert base_train.evaluate_core_metric(model, None, "cpu", args, 7) is None
    assert capsys.readouterr().out == "Step 00007 | CORE metric skipped: CORE eval bundle not found (offline)\n"
    monkeypatch.setattr(base_train, "evaluate_core", raising(BundleError("core.yaml: cannot read the task list")))
    assert base_train.evaluate_core_metric(model, None, "cpu", args, 9) is None  # a broken bundle is not "skipped"
    assert capsys.readouterr().out.startswith("Step 00009 | CORE metric failed (BundleError: core.yaml: cannot read")
    monkeypatch.setattr(base_train, "evaluate_core", raising(KeyError("centered_results")))
    assert base_train.evaluate_core_metric(model, None, "cpu", args, 8) is None
    out = capsys.readouterr().out
    assert out.startswith("Step 00008 | CORE metric failed (KeyError: 'centered_results')") and "skipped" not in out
    assert model.training  # back in training mode after the failed evaluation


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_another_seed_differs(train_dir):
    """Two runs with the same --seed and flags give the same step losses, val bpb and final weights bit for bit;
    another seed gives other weights. The seed is in the checkpoint meta, summary.json and the report section."""
    args = TINY + ["--num-iterations=3", "--eval-every=1"]
    runs = {tag: run_train(train_dir, args + [f"--seed={seed}", f"--model-tag={tag}"])
            for tag, seed in (("first", 7), ("again", 7), ("other", 8))}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    weights = {tag: torch.load(ckpt_dir(train_dir, tag) / "model_000003.pt") for tag in runs}
    assert step_losses(runs["first"].stdout) == step_losses(runs["again"].stdout)
    assert val_bpbs(runs["first"].stdout) == val_bpbs(runs["again"].stdout)
    assert all(torch.equal(weights["first"][k], weights["again"][k]) for k in weights["first"])
    assert not torch.equal(weights["first"]["transformer.wte.weight"], weights["other"]["transformer.wte.weight"])
    assert step_losses(runs["first"].stdout) != step_losses(runs["other"].stdout)
    summary = json.loads((ckpt_dir(train_dir, "first") / "summary.json").read_text())
    logged = val_bpbs(runs["first"].stdout)  # (printed with 6 decimals)
    assert summary["seed"] == 7 and [step for step, _ in summary["val_curve"]] == sorted(logged) == [0, 1, 2, 3]
    assert all(abs(bpb - logged[step]) < 1e-6 for step, bpb in summary["val_curve"])
    assert json.loads((ckpt_dir(train_dir, "other") / "meta_000003.json").read_text())["seed"] == 8
    assert "- seed: 8" in (train_dir / "report" / "base-model-training.md").read_text()


def test_seed_sets_the_initial_weights():
    """main seeds through compute_init before it builds the model: the seed alone decides the initial weights."""
    from nanochat.common import compute_init
    from scripts.base_train import build_parser, training_plan, build_model_and_optimizer

    def initial_weights(seed):
        args = build_parser().parse_args(TINY + ["--num-iterations=1", f"--seed={seed}"])
        plan = training_plan(args, 512, 2 * T, print0=lambda *a, **k: None)
        compute_init("cpu", args.seed)
        model, _ = build_model_and_optimizer(args, plan, torch.device("cpu"), None, use_compile=False)
        return model.state_dict()
    first, again, other = initial_weights(1), initial_weights(1), initial_weights(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["transformer.wte.weight"], other["transformer.wte.weight"])
    assert build_parser().parse_args([]).seed == 42  # the seed compute_init always used: default runs keep their init
