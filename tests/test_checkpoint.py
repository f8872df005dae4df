"""
checkpoint_manager: file layout and names, atomic writes + completion marker, incomplete checkpoints ignored,
model rebuild (build_model / load_model), unusable files, pruning, tags; the optimizer state saved by 2 gloo processes
resumed on 1 and the other way round (also from the per-rank layout of before).
"""

import io
import os
import json
import sys
import time
import errno
import pickle
import datetime
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import common, optim
from nanochat.cli import run
from nanochat.common import NanochatError, atomic_write
from nanochat import checkpoint_manager as ckpt
from conftest import make_tiny_model


def save_tokenizer(tokenizer, base_dir):
    from nanochat.tokenizer import compute_token_bytes
    tok_dir = os.path.join(base_dir, "tokenizer")
    tokenizer.save(tok_dir)
    torch.save(compute_token_bytes(tokenizer), os.path.join(tok_dir, "token_bytes.pt"))


def model_meta(model, step, **extra):
    import dataclasses
    return {"step": step, "model_config": dataclasses.asdict(model.config), **extra}


def test_layout_names_and_marker(tmp_path):
    d = tmp_path / "base_checkpoints" / "d2"
    ckpt.save_checkpoint(str(d), 123, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, {"step": 123, "x": float("inf")}, rank=0)
    names = sorted(os.listdir(d))
    assert names == ["complete_000123.json", "meta_000123.json", "model_000123.pt", "optim_000123.pt"]
    meta = json.loads((d / "meta_000123.json").read_text())
    assert meta["x"] == float("inf")
    assert not any(".tmp" in n for n in names)
    model_data, optim_data, meta = ckpt.load_checkpoint(str(d), 123, "cpu", load_optimizer=True)
    assert torch.equal(model_data["w"], torch.ones(2)) and optim_data == [{"state": {}, "param_groups": []}]
    ckpt.save_checkpoint(str(d), 124, {"w": torch.ones(2)}, None, {}, rank=0)
    with pytest.raises(ckpt.CheckpointError, match="step 124 in .* has no optimizer state"):
        ckpt.load_checkpoint(str(d), 124, "cpu", load_optimizer=True)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    d = str(tmp_path / "d3")
    ckpt.save_checkpoint(d, 5, {"w": torch.zeros(1)}, None, {"step": 5}, rank=0)
    ckpt.save_checkpoint(d, 10, {"w": torch.zeros(1)}, None, {"step": 10}, rank=0)
    assert ckpt.find_last_step(d) == 10
    # step 20 crashed after the model file but before the marker; a stray temp file is left too
    torch.save({"w": torch.zeros(1)}, os.path.join(d, "model_000020.pt"))
    open(os.path.join(d, "model_000030.pt.tmp.999"), "wb").close()
    assert ckpt.find_last_step(d) == 10
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 20"):
        ckpt.load_checkpoint(d, 20, "cpu")
    # re-saving a step removes its marker first, so an interrupted overwrite is never "complete"
    os.remove(os.path.join(d, "complete_000010.json"))
    assert ckpt.find_last_step(d) == 5
    # a directory with only incomplete checkpoints is not a model
    e = str(tmp_path / "d9")
    os.makedirs(e)
    torch.save({}, os.path.join(e, "model_000001.pt"))
    assert ckpt.find_largest_model(str(tmp_path)) == "d3"
    with pytest.raises(FileNotFoundError):
        ckpt.find_last_step(e)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = str(tmp_path / "model_000001.pt")
    atomic_write(path, lambda f: torch.save({"a": torch.ones(1)}, f))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(path, lambda f: torch.save({"a": Boom()}, f))
    assert torch.equal(torch.load(path)["a"], torch.ones(1))
    assert os.listdir(tmp_path) == ["model_000001.pt"]


def test_find_largest_model_and_last_step_integers(tmp_path):
    for tag, steps in (("d2", [1]), ("d10", [3, 1000000]), ("custom", [7])):
        for s in steps:
            ckpt.save_checkpoint(str(tmp_path / tag), s, {}, None, {}, rank=0)
    assert ckpt.find_largest_model(str(tmp_path)) == "d10"
    assert ckpt.find_last_step(str(tmp_path / "d10")) == 1000000
    with pytest.raises(FileNotFoundError):
        ckpt.find_largest_model(str(tmp_path / "nope"))


def test_build_model_load_model_and_optimizer(base_dir, tiny_tokenizer, tiny_model_factory, monkeypatch):
    save_tokenizer(tiny_tokenizer, base_dir)
    model = tiny_model_factory(tiny_tokenizer.get_vocab_size())
    opt = model.setup_optimizer()
    x = torch.randint(0, tiny_tokenizer.get_vocab_size(), (2, 16))
    model(x, x).backward()
    opt.step()
    d = os.path.join(base_dir, "base_checkpoints", "d2")
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # legacy compile prefix is stripped
    ckpt.save_checkpoint(d, 4, state, opt.state_dict(), model_meta(model, 4), rank=0)
    loaded, tok, meta = ckpt.load_model("base", "cpu", phase="eval")
    assert meta["step"] == 4 and not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    optim_state = ckpt.load_optimizer_state("base")
    assert len(optim_state) == 1 and len(optim_state[0]["param_groups"]) == len(opt.param_groups)
    # chat_sft's warm start on another number of processes: rank 1 of 2 takes the second half of the wte rows
    monkeypatch.setattr(optim, "rank_and_world", lambda: (1, 2))
    warm = model.setup_optimizer()
    warm.load_resharded(optim_state)
    wte = model.transformer.wte.weight
    half = wte.shape[0] // 2
    assert torch.equal(warm.state[wte]["exp_avg"], opt.state[wte]["exp_avg"][half:])
    loaded5, _, _ = ckpt.load_model("base", "cpu", phase="train", model_tag="d2", step=4)
    assert loaded5.training
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        ckpt.load_model("nope", "cpu", phase="eval")


# -----------------------------------------------------------------------------
# Unusable files, diverged state, leftovers, pruning, tags

def _saved_model(base_dir, tiny_tokenizer, tiny_model_factory, steps=(2, 4)):
    save_tokenizer(tiny_tokenizer, base_dir)
    model = tiny_model_factory(tiny_tokenizer.get_vocab_size())
    d = os.path.join(base_dir, "base_checkpoints", "d2")
    for step in steps:
        ckpt.save_checkpoint(d, step, model.state_dict(), None, model_meta(model, step), rank=0)
    return d


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "meta_truncated", "meta_foreign", "garbage",
                                    "tampered", "text", "nan"])
def test_unusable_checkpoint_is_one_clear_line(base_dir, tiny_tokenizer, tiny_model_factory, damage, capsys):
    d = _saved_model(base_dir, tiny_tokenizer, tiny_model_factory)
    model_file, meta_file = os.path.join(d, "model_000004.pt"), os.path.join(d, "meta_000004.json")
    if damage == "truncated":
        data = open(model_file, "rb").read()
        open(model_file, "wb").write(data[:len(data) // 2])
    elif damage == "empty":
        open(model_file, "wb").close()
    elif damage == "foreign":
        torch.save({"some.other.weight": torch.ones(3)}, model_file)
    elif damage == "garbage":
        open(model_file, "wb").write(bytes(range(256)) * 8)
    elif damage == "tampered":  # a pickle of something that is not tensors: torch would advise weights_only=False
        open(model_file, "wb").write(pickle.dumps({"w": datetime.date(2020, 1, 1)}, protocol=4))
    elif damage == "text":
        open(model_file, "w").write("hello world " * 10)
    elif damage == "nan":  # a complete checkpoint of a diverged model (save_checkpoint itself refuses to write one)
        state = torch.load(model_file)
        next(iter(state.values()))[0] = float("nan")
        torch.save(state, model_file)
    elif damage == "meta_truncated":
        text = open(meta_file).read()
        open(meta_file, "w").write(text[:len(text) // 2])
    else:
        open(meta_file, "w").write("[1, 2, 3]")
    bad_file = meta_file if damage.startswith("meta") else model_file
    with pytest.raises(FileNotFoundError) as excinfo:  # what every loader already handles
        ckpt.load_model("base", "cpu", phase="eval")
    assert bad_file in str(excinfo.value) and "previous complete step is 2" in str(excinfo.value)
    with pytest.raises(SystemExit) as excinfo:  # what an entry point prints: one error line, exit 1
        run(lambda: ckpt.load_model("base", "cpu", phase="eval"))
    message = capsys.readouterr().err.strip()
    assert excinfo.value.code == 1
    assert message.startswith("error:") and "\n" not in message and bad_file in message and "step is 2" in message
    assert "weights_only" not in message  # never the advice to unpickle a file that may be tampered with
    if damage == "nan":
        assert "NaN or infinite" in message


def test_non_finite_optimizer_state_is_refused_at_load(tmp_path):
    d = str(tmp_path / "d2")
    for step in (2, 4):
        ckpt.save_checkpoint(d, step, {"w": torch.ones(1)}, {"state": {0: {"m": torch.ones(2)}}}, {}, rank=0)
    torch.save({"state": {0: {"m": torch.tensor([1.0, float("inf")])}}}, ckpt.optim_path(d, 4))
    assert ckpt.load_checkpoint(d, 4, "cpu")[0]["w"].item() == 1.0  # the weights alone are fine
    with pytest.raises(ckpt.CheckpointError, match="optim_000004.pt holds NaN or infinite values.*step is 2"):
        ckpt.load_checkpoint(d, 4, "cpu", load_optimizer=True)


class FullDisk(io.FileIO):
    """A file on a disk with no space left: every write fails as the kernel reports it."""
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["model_", "meta_", "optim_", "complete_", "zip_writer"])
def test_full_disk_during_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failing):
    d = str(tmp_path / "d2")
    ckpt.save_checkpoint(d, 2, {"w": torch.ones(1)}, {"state": {}}, {"step": 2}, rank=0)
    before = sorted(os.listdir(d))
    if failing == "zip_writer":  # what torch.save raises when its writer fails, with no OSError behind it
        def failing_save(obj, f):
            f.write(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        monkeypatch.setattr(torch, "save", failing_save)
    else:  # the real torch writer on a full disk: OSError, then its zip writer's RuntimeError on top
        def full_disk_open(path, mode="r", **kwargs):
            if failing not in os.path.basename(path):
                return open(path, mode, **kwargs)
            f = io.BufferedWriter(FullDisk(path, "w"))
            return f if "b" in mode else io.TextIOWrapper(f, **kwargs)
        monkeypatch.setattr(common, "open", full_disk_open, raising=False)
    with pytest.raises(ckpt.CheckpointSaveError) as excinfo:
        ckpt.save_checkpoint(d, 4, {"w": torch.ones(100)}, {"state": {}}, {"step": 4}, rank=0)
    message = str(excinfo.value)
    assert "\n" not in message and "step 4" in message and "previous complete step is 2" in message, message
    assert ("unexpected pos" if failing == "zip_writer" else "No space left on device") in message, message
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__  # no second traceback
    assert sorted(os.listdir(d)) == before  # no temp file, no file of step 4
    assert ckpt.find_last_step(d) == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_temp_file_of_a_reused_pid_is_removed_on_save(tmp_path):
    d = tmp_path / "d2"
    d.mkdir()
    younger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:  # a save killed an hour ago left a temp file; its pid now belongs to a process that started since
        stale = d / f"optim_000002_rank0.pt.tmp.{younger.pid}"
        stale.write_bytes(b"x" * 100)
        an_hour_ago = time.time() - 3600
        os.utime(stale, (an_hour_ago, an_hour_ago))
        ckpt.save_checkpoint(str(d), 3, {"w": torch.ones(1)}, None, {}, rank=0)
        assert stale.name not in os.listdir(d)
    finally:
        younger.communicate()


def test_orphans_of_a_killed_prune_or_save_are_removed_on_save(tmp_path):
    d = str(tmp_path / "d2")
    for step in (2, 4, 6):
        ckpt.save_checkpoint(d, step, {"w": torch.ones(1)}, {"state": {}}, {}, rank=0)
    os.remove(ckpt.marker_path(d, 2))  # prune_checkpoints was killed right after removing the marker of step 2
    os.remove(ckpt.optim_path(d, 4))  # ... and the one of step 4 after removing its marker and optimizer state
    os.remove(ckpt.marker_path(d, 4))
    torch.save({"w": torch.ones(1)}, ckpt.model_path(d, 7))  # a save of step 7 killed before its marker
    torch.save({}, ckpt.rank_optim_path(d, 7, 1))  # ... or by the per-rank layout of before
    ckpt.save_checkpoint(d, 8, {"w": torch.ones(1)}, {"state": {}}, {}, rank=0)
    assert sorted(os.listdir(d)) == sorted(f"{kind}_{s:06d}{ext}" for s in (6, 8) for kind, ext in
                                           (("model", ".pt"), ("meta", ".json"), ("complete", ".json"), ("optim", ".pt")))


def test_prune_keeps_last_k(tmp_path):
    d = str(tmp_path / "d2")
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(d, step, {"w": torch.ones(1)}, {"state": {}}, {}, rank=0)
    for rank in (0, 1):  # step 4 also holds the per-rank optimizer files of a checkpoint written before
        torch.save({"state": {}}, ckpt.rank_optim_path(d, 4, rank))
    ckpt.prune_checkpoints(d, 2)
    assert ckpt.complete_steps(d) == [6, 8]
    assert sorted(os.listdir(d)) == sorted(f"{kind}_{s:06d}{ext}" for s in (6, 8) for kind, ext in
                                           (("model", ".pt"), ("meta", ".json"), ("complete", ".json"), ("optim", ".pt")))


@pytest.mark.parametrize("tag", ["../../x", "a/b", "..", "/abs", ""])
def test_model_tag_must_be_a_plain_name(tag):
    with pytest.raises(NanochatError) as excinfo:
        ckpt.check_model_tag(tag)
    assert str(excinfo.value).startswith("--model-tag=")
    assert ckpt.check_model_tag("d12_run-2.b") == "d12_run-2.b"


# -----------------------------------------------------------------------------
# Where checkpoints live, and resolving which one to load

def test_resolve_checkpoint_is_the_one_check_and_says_what_to_do(base_dir):
    stage = base_dir / "base_checkpoints"
    with pytest.raises(ckpt.CheckpointError, match=r"no base checkpoint found: .* is missing or empty; train one "
                                                   r"first with `python -m scripts.base_train`"):
        ckpt.resolve_checkpoint("base")
    for tag, steps in (("d2", [1, 3]), ("d4", [2])):
        for step in steps:
            ckpt.save_checkpoint(ckpt.checkpoint_dir_for("base", tag), step, {"w": torch.ones(1)}, None, {}, rank=0)
    assert ckpt.checkpoint_dir_for("base", "d2") == str(stage / "d2")
    assert ckpt.resolve_checkpoint("base") == (str(stage / "d4"), 2)  # the deepest model, its latest complete step
    assert ckpt.resolve_checkpoint("base", "d2") == (str(stage / "d2"), 3)
    assert ckpt.resolve_checkpoint("base", "d2", 1) == (str(stage / "d2"), 1)
    with pytest.raises(ckpt.CheckpointError, match=r"model tag 'd9' not found in .* \(available: d2, d4\)"):
        ckpt.resolve_checkpoint("base", "d9")
    os.remove(ckpt.marker_path(str(stage / "d2"), 1))  # an incomplete step is not there for loading
    for step in (1, 2):
        with pytest.raises(ckpt.CheckpointError, match=f"no checkpoint at step {step}: .*model_00000{step}.pt"):
            ckpt.resolve_checkpoint("base", "d2", step)
    with pytest.raises(NanochatError, match=r"--model-tag='\.\./x' must be a plain name"):
        ckpt.checkpoint_dir_for("sft", "../x")
    assert issubclass(ckpt.CheckpointError, NanochatError) and issubclass(ckpt.CheckpointError, FileNotFoundError)
    assert issubclass(ckpt.CheckpointSaveError, NanochatError)


def test_training_scripts_take_checkpoint_locations_from_checkpoint_manager():
    """No script spells out a <stage>_checkpoints directory: writers and readers agree through checkpoint_dir_for."""
    import ast
    import pathlib
    stage_dirs = set(ckpt.CHECKPOINT_SOURCES.values())
    scripts = sorted((pathlib.Path(ckpt.__file__).resolve().parents[1] / "scripts").glob("*.py"))
    assert scripts
    for path in scripts:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in stage_dirs]
        assert not literals, f"{path.name} writes {literals} by hand; use checkpoint_manager.checkpoint_dir_for"


# -----------------------------------------------------------------------------
# The optimizer state on another number of processes: a tiny GPT (3 layers: Muon groups of 3 matrices, so the second
# of 2 ranks keeps a padding matrix) trained 3 steps by 2 gloo processes or by 1, checkpointed, resumed on 2 and on 1

VOCAB, ROWS, SEQ = 256, 2, 16  # each rank's batch: 2 rows of 16 tokens


def rank_batch(step, rank):
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1000 * step + rank))
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, optimizer, step, ranks):
    """One step on the rows of `ranks`: a process holding both ranks' rows has the mean loss of the two ranks."""
    x, y = (torch.cat(parts) for parts in zip(*(rank_batch(step, rank) for rank in ranks)))
    model(x, y).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def update_of_step(model, optimizer, step, ranks):
    """How one step changes the weights."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, optimizer, step, ranks)
    return {k: v - before[k] for k, v in model.state_dict().items()}


def resumed_at_step_3(checkpoint_dir, with_optimizer_state=True):
    model_data, optim_data, _ = ckpt.load_checkpoint(str(checkpoint_dir), 3, "cpu", load_optimizer=True)
    model = make_tiny_model(VOCAB, n_layer=3, sequence_len=SEQ, seed=1)  # another init: weights come from the file
    model.load_state_dict(model_data)
    optimizer = model.setup_optimizer()
    if with_optimizer_state:
        optimizer.load_resharded(optim_data)
    return model, optimizer


def _two_process_resume_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = os.path.join(out_dir, "two"), os.path.join(out_dir, "per_rank")
    model = make_tiny_model(VOCAB, n_layer=3, sequence_len=SEQ)
    optimizer = model.setup_optimizer()
    for step in range(3):
        train_step(model, optimizer, step, [rank])
    ckpt.save_checkpoint(out[0], 3, model.state_dict(), optimizer.consolidated_state_dict(), {}, rank=rank,
                         sync_ranks=True)
    # the same checkpoint as this code wrote it before: one optimizer file per rank
    ckpt.save_checkpoint(out[1], 3, model.state_dict(), None, {}, rank=rank, sync_ranks=True)
    torch.save(optimizer.state_dict(), ckpt.rank_optim_path(out[1], 3, rank))
    dist.barrier()
    updates = {"uninterrupted": update_of_step(model, optimizer, 3, [rank])}
    for name in ("two", "per_rank", "one"):
        updates[name] = update_of_step(*resumed_at_step_3(os.path.join(out_dir, name)), 3, [rank])
    if rank == 0:
        torch.save(updates, os.path.join(out_dir, "two_process_updates.pt"))
    dist.destroy_process_group()


def assert_same_update(a, b):
    """Equal up to the order of float reductions: the 1-process backward sums 4 rows where 2 ranks average two sums of 2,
    a relative difference of a few fp32 ulps (~1e-7) in the gradients. The step carries it into the update without
    amplifying it much (AdamW divides by a second moment built over 3 steps; Muon normalizes), so 1e-4 of the largest
    entry of each update leaves a wide margin; a step without the saved optimizer state is off by far more."""
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4 * b[k].abs().max().item() + 1e-12, msg=k)


@pytest.mark.slow
def test_optimizer_state_resumes_on_another_number_of_processes(tmp_path):
    """2 -> 2 (bit for bit), 2 -> 1 and 1 -> 2: the first step after the resume, on the same batch, makes the update
    of the uninterrupted run. The same for a checkpoint in the per-rank layout of before."""
    os.environ["OMP_NUM_THREADS"] = "1"
    model = make_tiny_model(VOCAB, n_layer=3, sequence_len=SEQ)
    optimizer = model.setup_optimizer()
    for step in range(3):
        train_step(model, optimizer, step, [0, 1])
    ckpt.save_checkpoint(str(tmp_path / "one"), 3, model.state_dict(), optimizer.consolidated_state_dict(), {})
    one_process_update = update_of_step(model, optimizer, 3, [0, 1])
    mp.spawn(_two_process_resume_worker, args=(2, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path / "two")) == ["complete_000003.json", "meta_000003.json", "model_000003.pt",
                                                    "optim_000003.pt"]
    two = torch.load(tmp_path / "two_process_updates.pt")
    for name in ("two", "per_rank"):  # on as many processes as saved: bit-identical
        assert all(torch.equal(two[name][k], two["uninterrupted"][k]) for k in two["uninterrupted"]), name
        assert_same_update(update_of_step(*resumed_at_step_3(tmp_path / name), 3, [0, 1]), two["uninterrupted"])
    assert_same_update(two["one"], one_process_update)
    with pytest.raises(AssertionError):  # the saved optimizer state is what makes the updates agree
        assert_same_update(update_of_step(*resumed_at_step_3(tmp_path / "two", False), 3, [0, 1]), two["uninterrupted"])
    # a per-rank file gone missing is one line naming it
    os.remove(ckpt.rank_optim_path(str(tmp_path / "per_rank"), 3, 1))
    with pytest.raises(ckpt.CheckpointError) as excinfo:
        ckpt.load_checkpoint(str(tmp_path / "per_rank"), 3, "cpu", load_optimizer=True)
    assert "optim_000003_rank1.pt is missing" in str(excinfo.value) and "\n" not in str(excinfo.value)
