"""
RL on GSM8K with a tiny model: rollouts mask the prompt (only sampled tokens are trained), advantages are
group-mean centered, a couple of REINFORCE steps run end to end with pass@k evaluation, checkpoints land in
chatrl_checkpoints and the "Chat RL" report section is written. Resume: a run resumed from step k is bit-identical
to the uninterrupted one, SIGTERM saves and exits 0, a non-finite loss stops the run, an old checkpoint says why it
cannot be resumed. Hand-made GSM8K rows, offline.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import RowCounter, REPO_ROOT, terminate_after_line


def save_tiny_sft(base_dir, tokenizer, make_tiny_model, step=4, stage_dir="chatsft_checkpoints"):
    from nanochat.tokenizer import compute_token_bytes
    from nanochat.checkpoint_manager import save_checkpoint
    tok_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tok_dir)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tok_dir, "token_bytes.pt"))
    model = make_tiny_model(tokenizer.get_vocab_size(), sequence_len=64)
    meta = dict(step=step, model_config=asdict(model.config), user_config={}, max_seq_len=64)
    save_checkpoint(os.path.join(base_dir, stage_dir, "d2"), step, model.state_dict(), None, meta)


@pytest.fixture
def rl_env(base_dir, tmp_path, monkeypatch, tiny_tokenizer, tiny_model_factory):
    local = tmp_path / "local"
    (local / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        with open(local / "gsm8k" / f"{split}.jsonl", "w") as f:
            for a in range(1, 8):
                f.write(json.dumps({"question": f"Sam has {a} pens and finds {a + 1} more. How many pens?",
                                    "answer": f"{a}+{a + 1}=<<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}"}) + "\n")
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(local))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    save_tiny_sft(str(base_dir), tiny_tokenizer, tiny_model_factory)
    return base_dir


def test_rollouts_train_only_sampled_tokens(rl_env, tiny_tokenizer):
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from tasks.gsm8k import GSM8K
    from scripts.chat_rl import sample_groups, build_parser, rollout_seed
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    task = GSM8K("main", "train")
    args = build_parser().parse_args(["--device-batch-size=2", "--num-samples=4", "--max-new-tokens=6"])
    conversation = task[0]
    prompt = tokenizer.render_for_completion(conversation)
    [(inputs, targets, rewards, lengths)] = sample_groups(Engine(model, tokenizer), tokenizer, task, [(0, conversation)], args, 0)
    assert inputs.shape[0] == 4 and inputs.shape == targets.shape
    assert (targets[:, :len(prompt) - 1] == -1).all()  # the prompt is never trained
    assert (targets[:, len(prompt) - 1] >= 0).all()     # the first sampled token is
    assert set(rewards.tolist()) <= {0.0, 1.0}
    assert all(len(prompt) < n <= len(prompt) + 6 for n in lengths)
    # deterministic and distinct seeds per (--seed, step, example, sampling call)
    assert rollout_seed(42, 1, 2, 0) == rollout_seed(42, 1, 2, 0) != rollout_seed(42, 1, 2, 1)
    assert rollout_seed(42, 1, 2, 0) != rollout_seed(43, 1, 2, 0)
    again = sample_groups(Engine(model, tokenizer), tokenizer, task, [(0, conversation)], args, 0)[0]
    assert torch.equal(again[0], inputs)


def test_a_step_samples_its_examples_together(rl_env):
    """All examples of a step are decoded together, and each gets the rollouts it gets sampled alone (its own
    seeds), greedy or not."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from tasks.gsm8k import GSM8K
    from scripts.chat_rl import sample_groups, build_parser
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    task = GSM8K("main", "train")
    examples = [(i, task[i]) for i in (0, 3, 5)]
    for temperature in ("0", "1"):
        args = build_parser().parse_args(["--device-batch-size=2", "--num-samples=4", "--max-new-tokens=6", f"--temperature={temperature}"])
        counter = RowCounter(model)
        together = sample_groups(Engine(counter, tokenizer), tokenizer, task, examples, args, step=1)
        assert max(counter.rows) == 12  # 3 examples x 4 samples in one batch
        for example, group in zip(examples, together):
            alone = sample_groups(Engine(model, tokenizer), tokenizer, task, [example], args, step=1)[0]
            assert all(torch.equal(a, b) for a, b in zip(group[:3], alone[:3])) and group[3] == alone[3]


@pytest.mark.slow
def test_chat_rl_end_to_end(rl_env, capsys):
    from scripts import chat_rl
    result = chat_rl.main(["--device-type=cpu", "--num-steps=2", "--device-batch-size=2", "--num-samples=4",
                           "--examples-per-step=2", "--max-new-tokens=8", "--eval-every=2", "--eval-examples=2",
                           "--save-every=1"])
    out = capsys.readouterr().out
    assert "Calculated number of steps: 2" in out
    assert "Total sequences per step: 8" in out and "Calculated examples per rank: 2" in out
    assert "Step 0 | Pass@1: " in out and "Pass@2: " in out and "Step 2 | Pass@1: " in out
    assert "Step 1/2 | Average reward: " in out and "| Example step 1 | Pass 1 | loss: " in out
    assert result["num_steps"] == 2 and len(result["pass_at_k"]) == 2
    assert all(0.0 <= p <= 1.0 for p in result["pass_at_k"]) and math.isfinite(result["mean_reward"])
    ckpt = rl_env / "chatrl_checkpoints" / "d2"
    assert (ckpt / "model_000001.pt").exists() and (ckpt / "model_000002.pt").exists()
    report = (rl_env / "report" / "chat-rl.md").read_text()
    assert "## Chat RL" in report and "GSM8K pass@1" in report
    # the RL checkpoint loads back (for chat_eval -i rl)
    from nanochat.checkpoint_manager import load_model
    model, _, meta = load_model("rl", "cpu", phase="eval")
    assert meta["step"] == 2 and model.config.n_layer == 2


def test_policy_gradient_follows_advantage(tiny_tokenizer, tiny_model_factory):
    """The loss used by chat_rl raises the log-prob of the better-than-average sample, lowers the other's."""
    from scripts.chat_rl import policy_gradient_loss
    model = tiny_model_factory(tiny_tokenizer.get_vocab_size())
    x = torch.randint(0, 500, (2, 10))
    y = torch.randint(0, 500, (2, 10))
    y[:, :4] = -1
    rewards = torch.tensor([1.0, 0.0])
    adv = rewards - rewards.mean()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = -model(x, y, loss_reduction="none").view_as(x).sum(dim=1).detach()
    loss = policy_gradient_loss(model, x, y, adv)
    loss.backward()
    optimizer.step()
    after = -model(x, y, loss_reduction="none").view_as(x).sum(dim=1).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_bad_flags_and_missing_checkpoint(base_dir, capsys):
    from scripts import chat_rl
    from nanochat.common import NanochatError
    with pytest.raises(NanochatError, match="--num-samples=6 must be a multiple of --device-batch-size=4"):
        chat_rl.main(["--num-samples=6", "--device-batch-size=4"])  # a value check: cli.run's error line, exit 1
    with pytest.raises(SystemExit) as excinfo:  # one error line, not a ZeroDivisionError
        chat_rl.main(["--device-batch-size=0"])
    assert excinfo.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --device-batch-size: must be an integer in [1, inf), got 0")
    with pytest.raises(NanochatError) as excinfo:
        chat_rl.main(["--device-type=cpu"])
    assert "no sft checkpoint found" in str(excinfo.value)


def test_full_disk_at_a_save_is_one_clear_line(rl_env, full_disk):
    from scripts import chat_rl
    from nanochat.checkpoint_manager import CheckpointSaveError
    with pytest.raises(CheckpointSaveError) as excinfo:
        chat_rl.main(["--device-type=cpu", "--num-steps=1", "--device-batch-size=2", "--num-samples=2",
                      "--examples-per-step=1", "--max-new-tokens=4", "--eval-examples=2", "--save-every=1"])
    message = str(excinfo.value)
    assert message.startswith("could not save the checkpoint of step 1") and "\n" not in message, message
    assert "No space left on device" in message
    assert os.listdir(rl_env / "chatrl_checkpoints" / "d2") == []


def test_command_line_turns_a_bad_value_into_one_error_line(base_dir):
    """`python -m scripts.chat_rl` runs main through cli.run: a value check is one `error:` line and exit 1."""
    import subprocess
    import sys
    from conftest import REPO_ROOT
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_rl", "--num-samples=6", "--device-batch-size=4"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --num-samples=6 must be a multiple of --device-batch-size=4"]


# -----------------------------------------------------------------------------
# Resume

# 4 steps of 2 prompts (7 training problems: the prompts wrap around), 2 passes of 2 rows per prompt
RESUME_RUN = ["--device-type=cpu", "--num-steps=4", "--device-batch-size=2", "--num-samples=4", "--examples-per-step=2",
              "--max-new-tokens=8", "--eval-every=2", "--eval-examples=2", "--save-every=2"]


@pytest.fixture
def rewards_that_vary(monkeypatch):
    """The tiny model never solves a problem, so every advantage would be 0 and nothing would train: reward the
    completions of even length instead (a deterministic function of the sample)."""
    from tasks.gsm8k import GSM8K
    monkeypatch.setattr(GSM8K, "reward", lambda self, conversation, completion: float(len(completion) % 2 == 0))


def step_lines(text):
    """The lines the loop prints per step (losses, rewards, pass@k)."""
    return [line for line in text.splitlines() if line.startswith("Step ")]


def test_step_prompts_are_a_function_of_the_step(rl_env):
    """The prompts of a step are its examples_per_step consecutive problems (cycling), dealt to the ranks: the same
    problems on any number of processes."""
    from scripts.chat_rl import step_example_indices
    order = [6, 2, 0, 5, 1, 3, 4]  # a --seed shuffle of 7 problems
    assert step_example_indices(0, 4, 0, 1, order) == [6, 2, 0, 5]
    assert step_example_indices(1, 4, 0, 1, order) == [1, 3, 4, 6]  # wraps into the next epoch
    for step in range(5):
        one = step_example_indices(step, 4, 0, 1, order)
        two = [step_example_indices(step, 4, rank, 2, order) for rank in (0, 1)]
        assert sorted(two[0] + two[1]) == sorted(one) and len(two[0]) == len(two[1]) == 2


@pytest.mark.slow
def test_resume_is_bit_identical(rl_env, rewards_that_vary, capsys):
    """Resumed from its step-2 checkpoint, a run prints the same losses, rewards and pass@k as the uninterrupted one
    and ends with the same weights and optimizer state (prompts, rollout seeds, optimizer, LR schedule, history)."""
    from scripts import chat_rl
    full = chat_rl.main(RESUME_RUN)
    full_out = capsys.readouterr().out
    d = rl_env / "chatrl_checkpoints" / "d2"
    full_model, full_optim = torch.load(d / "model_000004.pt"), torch.load(d / "optim_000004.pt")
    assert full_model.keys() == torch.load(d / "model_000002.pt").keys()
    assert any(not torch.equal(full_model[k], torch.load(d / "model_000002.pt")[k]) for k in full_model), "nothing trained"

    resumed = chat_rl.main(RESUME_RUN + ["--resume-from-step=2"])
    resumed_out = capsys.readouterr().out
    assert f"Resuming from step 2 of {d}: saved by 1 process(es), now 1" in resumed_out
    # the checkpoint of step 2 was saved after its evaluation, so the resumed run does not repeat it
    after_2 = [line for line in step_lines(full_out) if not line.startswith(("Step 0", "Step 1", "Step 2 | Pass"))]
    assert len(after_2) == 11 and step_lines(resumed_out) == after_2, (step_lines(full_out), step_lines(resumed_out))
    assert resumed["history"] == full["history"] and resumed["pass_at_k"] == full["pass_at_k"]
    resumed_model, resumed_optim = torch.load(d / "model_000004.pt"), torch.load(d / "optim_000004.pt")
    for k in full_model:
        assert torch.equal(full_model[k], resumed_model[k]), k
    assert full_optim["param_groups"] == resumed_optim["param_groups"]
    for k, state in full_optim["state"].items():
        for name, value in state.items():
            other = resumed_optim["state"][k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (k, name)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_zero(rl_env):
    cmd = [sys.executable, "-m", "scripts.chat_rl", "--device-type=cpu", "--num-steps=100000", "--device-batch-size=2",
           "--num-samples=2", "--examples-per-step=1", "--max-new-tokens=4", "--eval-examples=1", "--save-every=100000"]
    # unbuffered: the line we wait for arrives when it is printed, not when a pipe buffer fills
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = terminate_after_line(proc, "Step 1/100000 | Average reward")
    assert proc.returncode == 0, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("Stopped by signal at step ")]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split()[5].rstrip(";"))
    assert step >= 2 and stopped[0].endswith(f"resume with --resume-from-step={step} (and the same flags)")
    from nanochat.checkpoint_manager import complete_steps, load_meta
    d = str(rl_env / "chatrl_checkpoints" / "d2")
    assert complete_steps(d) == [step] and os.path.exists(os.path.join(d, f"optim_{step:06d}.pt"))
    meta = load_meta(d, step)
    assert meta["stage"] == "rl" and len(meta["loop_state"]["history"]["train"]) == step
    assert not (rl_env / "report" / "chat-rl.md").exists()  # a preempted run is not a finished run


def test_non_finite_loss_stops_the_run(rl_env, monkeypatch):
    """A loss that turns NaN at step 1 stops every rank with one line naming the last good checkpoint (step 1);
    nothing after it is saved."""
    from scripts import chat_rl
    from nanochat.resume import TrainingDiverged
    real_loss, calls = chat_rl.policy_gradient_loss, []

    def loss_that_turns_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss if len(calls) == 1 else loss * float("nan")
    monkeypatch.setattr(chat_rl, "policy_gradient_loss", loss_that_turns_nan)
    with pytest.raises(TrainingDiverged) as excinfo:
        chat_rl.main(["--device-type=cpu", "--num-steps=3", "--device-batch-size=2", "--num-samples=2",
                      "--examples-per-step=1", "--max-new-tokens=4", "--eval-examples=1", "--save-every=1"])
    message = str(excinfo.value)
    assert message.startswith("RL loss became non-finite at step 1") and "\n" not in message, message
    d = rl_env / "chatrl_checkpoints" / "d2"
    assert f"the last good checkpoint is step 1 in {d}" in message
    from nanochat.checkpoint_manager import complete_steps
    assert complete_steps(str(d)) == [1]


def test_resuming_an_old_checkpoint_says_why_not(rl_env, tiny_tokenizer, tiny_model_factory):
    """An RL checkpoint written before RL could resume (weights only, no optimizer or loop state) still loads as a
    model, and resuming from it is one clear line."""
    from scripts import chat_rl
    from nanochat.common import NanochatError
    from nanochat.checkpoint_manager import load_model
    save_tiny_sft(str(rl_env), tiny_tokenizer, tiny_model_factory, step=4, stage_dir="chatrl_checkpoints")
    model, _, meta = load_model("rl", "cpu", phase="eval")
    assert meta["step"] == 4 and model.config.n_layer == 2
    with pytest.raises(NanochatError) as excinfo:
        chat_rl.main(["--device-type=cpu", "--num-steps=6", "--device-batch-size=2", "--num-samples=2",
                      "--resume-from-step=4"])
    message = str(excinfo.value)
    assert message.startswith("--resume-from-step=4: the checkpoint in ") and "\n" not in message, message
    assert "without the state of its training loop" in message and "not for resuming" in message


def test_seed_sets_the_rollouts(rl_env):
    """--seed is part of every rollout's sampling seed: the same seed samples the same completions, another seed
    others (at temperature 1)."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    from tasks.gsm8k import GSM8K
    from scripts.chat_rl import sample_groups, build_parser
    model, tokenizer, _ = load_model("sft", "cpu", phase="eval")
    task = GSM8K("main", "train")

    def rollouts(seed):
        args = build_parser().parse_args(["--device-batch-size=4", "--num-samples=4", "--max-new-tokens=8",
                                          f"--seed={seed}"])
        return sample_groups(Engine(model, tokenizer), tokenizer, task, [(0, task[0])], args, step=3)[0][0]
    assert torch.equal(rollouts(1), rollouts(1)) and not torch.equal(rollouts(1), rollouts(2))


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_another_seed_differs(rl_env, monkeypatch):
    """Two RL runs with the same --seed take the same prompts in the same order and end with the same weights;
    another seed takes the prompts in another order. The seed is in the checkpoint meta and the report section."""
    from nanochat.checkpoint_manager import load_model
    from scripts import chat_rl
    prompts = []  # the training problems each run samples, in order
    sample_groups = chat_rl.sample_groups

    def recording(engine, tokenizer, task, examples, args, step):
        prompts[-1].extend(i for i, _ in examples)
        return sample_groups(engine, tokenizer, task, examples, args, step)
    monkeypatch.setattr(chat_rl, "sample_groups", recording)

    def reinforce(seed):
        prompts.append([])
        result = chat_rl.main(["--device-type=cpu", "--num-steps=2", "--device-batch-size=2", "--num-samples=2",
                               "--examples-per-step=2", "--max-new-tokens=6", "--eval-every=2", "--eval-examples=2",
                               "--temperature=1", f"--seed={seed}"])
        model, _, meta = load_model("rl", "cpu", phase="eval")
        assert meta["seed"] == seed
        return result, model.state_dict()
    (first, first_weights), (again, again_weights), _ = reinforce(5), reinforce(5), reinforce(6)
    assert first["history"] == again["history"] and prompts[0] == prompts[1]
    assert all(torch.equal(first_weights[k], again_weights[k]) for k in first_weights)
    assert len(prompts[0]) == 4 and prompts[2] != prompts[0]
    assert "- seed: 6" in (rl_env / "report" / "chat-rl.md").read_text()
