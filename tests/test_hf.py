"""
Hugging Face interop: the exported model reproduces our GPT (logits, greedy generation), the exported tokenizer
reproduces ours (text and chat rendering), and base_eval --hf-path evaluates any transformers causal LM, with the
closed loop checkpoint -> export -> base_eval --hf-path giving the same CORE and bits per byte as the checkpoint.
"""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
pytest.importorskip("transformers", reason="optional dependency group hf not installed (pip install -e .[hf])")
pytest.importorskip("safetensors", reason="optional dependency group hf not installed (pip install -e .[hf])")
import transformers  # noqa: E402

from conftest import REPO_ROOT, SHARED_DATA, make_tiny_model, tiny_corpus  # noqa: E402
from nanochat.checkpoint_manager import load_model, save_checkpoint  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.hf import HFTokenizer, export_hf  # noqa: E402
from nanochat.tokenizer import compute_token_bytes  # noqa: E402

REAL_BUNDLE = Path(os.environ.get("NANOCHAT_EVAL_BUNDLE") or SHARED_DATA / "eval_bundle")  # the env var as in base_eval
SEQUENCE_LEN = 64  # short windows are 16 tokens, the full window 64: inputs of 100 tokens exercise both


@pytest.fixture(autouse=True)
def hub_offline(monkeypatch):
    """Tests never reach the hub. Set per test (not at import, which would leak into every other test module)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def perturbed_model(vocab_size, seed=1):
    """A tiny GPT with every parameter (gates, lambdas, zero-initialised projections) moved off its init."""
    model = make_tiny_model(vocab_size, n_layer=3, n_head=4, n_kv_head=2, sequence_len=SEQUENCE_LEN, window_pattern="SL")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_tokenizer, tmp_path_factory):
    """(our model, our tokenizer, the fp32 export loaded back with transformers: model, tokenizer, directory)."""
    model = perturbed_model(tiny_tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("export")
    export_hf(model, tiny_tokenizer, str(out))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    return model, tiny_tokenizer, hf_model, hf_tokenizer, out


def test_export_files(exported):
    *_, out = exported
    for name in ("model.safetensors", "config.json", "hf_modeling.py", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name


@pytest.mark.parametrize("T", [16, SEQUENCE_LEN, 100])
def test_logits_match(exported, T):
    model, tokenizer, hf_model, *_ = exported
    idx = torch.randint(0, tokenizer.get_vocab_size(), (3, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_generate_matches_engine(exported):
    model, tokenizer, hf_model, *_ = exported
    # a prompt longer than the full window, so the cached decode runs through every window rule
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, prepend=tokenizer.get_bos_token_id())
    assert len(prompt) > SEQUENCE_LEN
    results, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=32, temperature=0)
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                            eos_token_id=None)
    ours = results[0][len(prompt):]
    assert len(ours) == 32, "the engine stopped early; pick another seed"
    assert out[0, len(prompt):].tolist() == ours


def left_padded(rows, pad):
    """(ids, attention_mask) of the rows padded on the left to the longest."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def test_left_padded_batch_equals_each_row_alone(exported):
    """attention_mask: a left-padded row gives its unpadded logits at its real tokens, and batched greedy generate()
    gives every row the tokens it gets alone. Rows from 3 tokens to past the full window, so padding spans windows."""
    model, tokenizer, hf_model, *_ = exported
    bos = tokenizer.get_bos_token_id()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    rows = [tokenizer.encode(text, prepend=bos)[:n] for n in (3, 20, SEQUENCE_LEN + 10)]
    ids, mask = left_padded(rows, pad=bos)
    with torch.no_grad():
        batched = hf_model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = hf_model(torch.tensor([row])).logits[0]
            assert (batched[i, ids.size(1) - len(row):] - alone).abs().max().item() < 1e-4, f"row {i}"
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=bos,
                                eos_token_id=None)
        for i, row in enumerate(rows):
            alone = hf_model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                      max_new_tokens=20, do_sample=False, eos_token_id=None)
            assert out[i, ids.size(1):].tolist() == alone[0, len(row):].tolist(), f"row {i}"
        # the same through the exported tokenizer, as the README shows (it pads on the left)
        *_, out_dir = exported
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
        hf_tokenizer.pad_token = hf_tokenizer.eos_token
        texts = [tokenizer.decode(row[1:]) for row in rows]
        batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
        assert batch["input_ids"][:, -1].tolist() == [row[-1] for row in rows]
        generated = hf_model.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=None)
        assert generated[:, batch["input_ids"].size(1):].tolist() == out[:, ids.size(1):].tolist()
    with pytest.raises(ValueError, match="attention_mask"):
        hf_model(ids, attention_mask=mask[:, 1:])


def test_tokenizer_and_pipeline_prepend_bos(exported):
    """Our models were trained on documents that start with <|bos|>: tokenizer(text) and the text-generation pipeline
    add it, add_special_tokens=False leaves it out, and the chat template (which writes its own) does not double it."""
    model, tokenizer, hf_model, hf_tokenizer, _ = exported
    bos, text = tokenizer.get_bos_token_id(), "The quick brown fox"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text, prepend=bos)
    assert hf_tokenizer.encode(text) == tokenizer.encode(text, prepend=bos)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True)
    assert chat["input_ids"].count(bos) == 1 and chat["input_ids"][0] == bos
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    generated = pipe(text, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = tokenizer.encode(text, prepend=bos)
    results, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=8, temperature=0)
    assert list(generated)[:len(prompt)] == prompt and len(results[0]) > len(prompt) + 2
    assert list(generated)[len(prompt):len(results[0])] == results[0][len(prompt):]


def test_tokenizer_round_trip_and_token_bytes(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    texts = tiny_corpus()[:20] + ["Numbers 1234567 and  spaces\t\ttabs\r\n\nÜnïcödé 日本語 🙂 it's I'LL we've"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text
    for name in tokenizer.get_special_tokens():
        assert hf_tokenizer.convert_tokens_to_ids(name) == tokenizer.encode_special(name)
    assert torch.equal(HFTokenizer(hf_tokenizer).token_bytes(), compute_token_bytes(tokenizer))


def test_chat_template_renders_like_our_tokenizer(exported):
    _, tokenizer, _, hf_tokenizer, _ = exported
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
                {"role": "assistant", "content": "I am nanochat.\nAsk me anything!"},
                {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    ids, _ = tokenizer.render_conversation({"messages": messages})
    assert hf_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"] == ids
    prompt = tokenizer.render_for_completion({"messages": messages})
    hf_prompt = hf_tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True)
    assert hf_prompt["input_ids"] == prompt


def test_core_losses_match_on_real_examples(exported):
    """CORE's per-choice losses through the HF adapters equal ours, on real items of each task type."""
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    from nanochat.core_eval import load_core_tasks, load_jsonl, score_example
    from nanochat.hf import HFModel
    model, tokenizer, hf_model, hf_tokenizer, _ = exported
    tasks, _ = load_core_tasks(str(REAL_BUNDLE))
    picked = {meta["task_type"]: (meta, path) for _, meta, path, _ in tasks}
    for meta, path in picked.values():
        data = load_jsonl(path, meta["task_type"])[:3]
        for i in range(len(data)):
            ours = score_example(i, model, tokenizer, data, "cpu", meta)
            theirs = score_example(i, HFModel(hf_model), HFTokenizer(hf_tokenizer), data, "cpu", meta)
            assert ours[0] == theirs[0]
            if ours[1] is not None:
                assert ours[1] == pytest.approx(theirs[1], abs=1e-4)


def test_bf16_export_from_sft_checkpoint(base_dir, tiny_tokenizer, tmp_path):
    """python -m scripts.export_hf on an sft checkpoint, bf16 weights: loads in bf16 and agrees to bf16 precision."""
    from scripts.export_hf import main
    save_tokenizer(tiny_tokenizer, base_dir)
    model = perturbed_model(tiny_tokenizer.get_vocab_size())
    meta = {"step": 7, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d3"), 7, model.state_dict(), None, meta)
    main(["--source", "sft", "--dtype", "bfloat16", "--output-dir", str(tmp_path / "bf16")])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), trust_remote_code=True)
    assert hf_model.dtype == torch.bfloat16
    idx = torch.randint(0, tiny_tokenizer.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < 0.25, diff  # soft-capped logits (|x| < 15) through 3 layers of bf16


# -----------------------------------------------------------------------------
# base_eval --hf-path


def save_tokenizer(tokenizer, base_dir):
    tokenizer.save(str(base_dir / "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), base_dir / "tokenizer" / "token_bytes.pt")


def test_hf_path_hub_name_offline_fails_fast(base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--hf-path", "openai-community/gpt2",
                             "--eval", "sample", "--device-type", "cpu"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --hf-path=openai-community/gpt2: no such local directory, and the hub is offline "
        "(HF_HUB_OFFLINE/NANOCHAT_OFFLINE); pass a directory written by save_pretrained"]


def tiny_gpt2(directory):
    """A random GPT-2 with a 128-token context and a byte-level BPE trained here, saved with save_pretrained."""
    import tokenizers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(tiny_corpus(), trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_base_eval(capsys, *args):
    from scripts.base_eval import main
    capsys.readouterr()
    main(["--device-type", "cpu", *args])
    return capsys.readouterr().out


def core_metric(out):
    return float(re.search(r"CORE metric: (\S+)", out).group(1))


def test_hf_path_tiny_gpt2_on_real_bundle(base_dir, tmp_path, capsys):
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    tiny_gpt2(tmp_path / "gpt2_tiny")
    # few-shot prompts run far past 128 tokens: they must be cropped to the model's context, not crash
    out = run_base_eval(capsys, "--hf-path", str(tmp_path / "gpt2_tiny"), "--eval", "core,sample", "--max-per-task", "1",
                        "--bundle-dir", str(REAL_BUNDLE))
    assert f"Evaluating {tmp_path / 'gpt2_tiny'}" in out and "Unconditioned samples:" in out
    assert -1.0 < core_metric(out) < 1.0
    csv_text = (base_dir / "base_eval" / "hf_gpt2_tiny.csv").read_text()
    assert csv_text.startswith("Task") and "hellaswag" in csv_text
    assert f"- Model: {tmp_path / 'gpt2_tiny'}" in (base_dir / "report" / "base-model-evaluation.md").read_text()


def few_task_bundle(directory, labels):
    """The real bundle restricted to a few tasks (one per task type), sharing its data files."""
    import yaml
    directory.mkdir()
    config = yaml.safe_load((REAL_BUNDLE / "core.yaml").read_text())
    config["icl_tasks"] = [t for t in config["icl_tasks"] if t["label"] in labels]
    (directory / "core.yaml").write_text(yaml.safe_dump(config))
    (directory / "eval_meta_data.csv").write_bytes((REAL_BUNDLE / "eval_meta_data.csv").read_bytes())
    (directory / "eval_data").symlink_to(REAL_BUNDLE / "eval_data")
    return directory


def csv_rows(path):
    """{task: [accuracy, centered]} from a base_eval CSV."""
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    return {row[0].strip(): [float(v) for v in row[1:] if v.strip()] for row in rows}


def test_closed_loop_core_and_bpb(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    """checkpoint -> export -> base_eval --hf-path gives the CORE and bpb of base_eval on the checkpoint."""
    if not REAL_BUNDLE.is_dir():
        pytest.skip(f"real eval bundle not found at {REAL_BUNDLE}")
    from nanochat.local_data import build_from_dir
    bundle = few_task_bundle(tmp_path / "bundle", ["hellaswag_zeroshot", "jeopardy", "arc_easy", "winogrande"])
    save_tokenizer(tiny_tokenizer, base_dir)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, doc in enumerate(tiny_corpus()):
        (texts / f"doc{i}.txt").write_text(doc)
    monkeypatch.setenv("NANOCHAT_DATASET", "local")
    build_from_dir(str(texts))
    model = perturbed_model(tiny_tokenizer.get_vocab_size())
    meta = {"step": 5, "model_config": dataclasses.asdict(model.config)}
    save_checkpoint(str(base_dir / "base_checkpoints" / "d3"), 5, model.state_dict(), None, meta)
    loaded, tokenizer, _ = load_model("base", "cpu", phase="eval")
    export_hf(loaded, tokenizer, str(tmp_path / "exported"))
    flags = ["--eval", "core,bpb", "--max-per-task", "4", "--bundle-dir", str(bundle),
             "--device-batch-size", "2", "--split-tokens", "256"]
    ours = run_base_eval(capsys, *flags)
    theirs = run_base_eval(capsys, "--hf-path", str(tmp_path / "exported"), *flags)
    ours_core, theirs_core = csv_rows(base_dir / "base_eval" / "base_model_000005.csv"), csv_rows(base_dir / "base_eval" / "hf_exported.csv")
    assert ours_core.keys() == theirs_core.keys() and len(ours_core) == 5  # 4 tasks + the CORE row
    for task, values in ours_core.items():
        assert values == pytest.approx(theirs_core[task], abs=1e-4), task
    for split in ("train", "val"):
        ours_bpb = float(re.search(rf"{split} bpb: (\S+)", ours).group(1))
        theirs_bpb = float(re.search(rf"{split} bpb: (\S+)", theirs).group(1))
        assert abs(ours_bpb - theirs_bpb) < 1e-4
    print(f"closed loop: CORE {ours_core} vs {theirs_core}; bpb {ours_bpb} vs {theirs_bpb}", file=sys.stderr)
