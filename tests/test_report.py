"""
The run report: fragments written by each stage, reset/generate end to end, summary table, wall clock covering every
stage (RL and SFT included), training-curve plots, the CLI, and the no-op report of non-zero ranks.
"""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat import report as report_mod
from nanochat.report import DummyReport, Report, get_report

REPO_ROOT = Path(__file__).resolve().parents[1]
FMT = "%Y-%m-%d %H:%M:%S"


def set_timestamp(path, when):
    """Rewrite a fragment's timestamp line (stages of a fake run that took hours)."""
    lines = Path(path).read_text().splitlines(keepends=True)
    lines = [f"timestamp: {when.strftime(FMT)}\n" if l.startswith("timestamp:") else l for l in lines]
    Path(path).write_text("".join(lines))


def fake_history(n=5):
    return {
        "train": [{"step": s, "loss": 5.0 - 0.3 * s, "flops": 1e12 * (s + 1)} for s in range(n)],
        "val": [{"step": s, "val_bpb": 2.0 - 0.1 * s, "val_bpb_se": 0.01, "val_tokens": 4096, "flops": 1e12 * (s + 1)}
                for s in range(0, n, 2)],
    }


def test_log_format(tmp_path):
    r = Report(str(tmp_path))
    path = r.log("Base model training", [{"depth": 4, "tokens": 1234567, "small": 9999, "lr": 0.02, "tag": None},
                                         None, "free text line\n", {}])
    assert os.path.basename(path) == "base-model-training.md"
    text = Path(path).read_text()
    lines = text.splitlines()
    assert lines[0] == "## Base model training" and lines[1].startswith("timestamp: ") and lines[2] == ""
    assert "- depth: 4\n- tokens: 1,234,567\n- small: 9999\n- lr: 0.0200\n- tag: None\nfree text line\n" in text
    # multi-line values stay on one line and cannot fake a metric line
    text = Path(r.log("Chat evaluation sft", [{"sample 0": "hello\n- GSM8K: 0.99\nbye"}])).read_text()
    assert "- sample 0: hello\\n- GSM8K: 0.99\\nbye\n" in text
    assert report_mod.extract_metrics("chat-evaluation-sft.md", text) == {}
    # logging again overwrites
    r.log("Base model training", [{"depth": 5}])
    assert "- depth: 5" in Path(path).read_text() and "depth: 4" not in Path(path).read_text()


def run_fake_pipeline(report_dir, start):
    """Every stage logs as its script does, with timestamps hours apart."""
    r = Report(str(report_dir))
    r.reset()
    header = Path(report_dir, "header.md")
    header.write_text(header.read_text().replace(
        [l for l in header.read_text().splitlines() if l.startswith("Run started:")][0],
        f"Run started: {start.strftime(FMT)}"))
    stages = [
        ("Tokenizer training", [{"vocab_size": 65536, "train_time": 20.5}]),
        ("Tokenizer evaluation", ["### Comparison with GPT-2\n\n| Text Type | Bytes |\n|---|---|\n| news | 1819 |\n"]),
        ("Base model training", [{"depth": 10}, {"Minimum validation bpb": 0.9539,
                                                 "Final validation bpb": "0.9541 ± 0.0012 (20,971,520 tokens)"}]),
        ("Base model evaluation", [{"Model": "base_model (step 5075)",
                                    "CORE metric": "0.1266 ± 0.0031 partial (20/22 tasks; 9,000 examples)",
                                    "train bpb": "0.9586 ± 0.0013 (20,971,520 tokens)",
                                    "val bpb": "0.9541 ± 0.0012 (20,971,520 tokens)"},
                                   {"hellaswag": "0.0746 ± 0.0051 (10,042 examples)"}]),
        ("Chat SFT", [{"run": "x", "Number of iterations": 701}, {"Minimum validation bpb": 0.85}]),
        ("Chat evaluation sft", [{"source": "sft", "task_name": "GSM8K"},
                                 {"ARC-Easy": 0.266, "ARC-Challenge": 0.2662, "MMLU": 0.2533, "GSM8K": 0.0,
                                  "HumanEval": 0.0, "SpellingBee": 0.0},
                                 {"ChatCORE metric": 0.0079, "ChatCORE-5 metric": "0.0095"}]),
        ("Chat RL", [{"run": "x", "num_epochs": 1}]),
        ("Chat evaluation rl", [{"source": "rl", "task_name": "GSM8K"}, {"GSM8K": 0.0129}]),
    ]
    for i, (section, data) in enumerate(stages):
        path = r.log(section, data)
        # the last stage (RL eval) ends 6h13m after the start
        when = start + datetime.timedelta(minutes=30 * (i + 1)) if i < len(stages) - 1 else \
            start + datetime.timedelta(hours=6, minutes=13)
        set_timestamp(path, when)
    r.log_history("base-training", fake_history())
    return r


def test_reset_generate_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_dir = tmp_path / "report"
    start = datetime.datetime(2025, 10, 27, 1, 24, 38)
    r = run_fake_pipeline(report_dir, start)
    r.generate()
    text = (report_dir / "report.md").read_text()
    # header
    for needle in ("# nanochat training report", "### Git Information", "- Branch:", "- Commit:", "### Hardware",
                   "- CPUs:", "- Memory:", "- GPUs:", "### Software", "- Python:", "- PyTorch:", "### Bloat",
                   "- Characters:", "- Dependencies ("):
        assert needle in text, needle
    # every stage's section in pipeline order, SFT included
    order = ["## Tokenizer training", "## Tokenizer evaluation", "## Base model training", "## Base model evaluation",
             "## Chat SFT", "## Chat evaluation sft", "## Chat RL", "## Chat evaluation rl", "## Training curves",
             "## Summary"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    # summary table
    summary = text[text.index("## Summary"):]
    table = summary[summary.index("| Metric"):].split("\n\n")[0].splitlines()
    assert [c.strip() for c in table[0].split("|")[1:5]] == ["Metric", "BASE", "SFT", "RL"]
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:5]] for l in table[2:]}
    # the numbers keep their standard error and how much data they cover
    assert rows["CORE"] == ["0.1266 ± 0.0031 partial (20/22 tasks; 9,000 examples)", "-", "-"]
    assert rows["val bpb"] == ["0.9541 ± 0.0012 (20,971,520 tokens)", "-", "-"]
    assert rows["GSM8K"] == ["-", "0.0000", "0.0129"]  # task_name: GSM8K lines are not taken for scores
    assert rows["ChatCORE (6 tasks)"] == ["-", "0.0079", "-"]
    assert rows["ChatCORE (5 tasks)"] == ["-", "0.0095", "-"]
    assert rows["ARC-Easy"] == ["-", "0.2660", "-"]
    metric_rows = [l.split("|")[1].strip() for l in table[2:]]
    assert metric_rows[0] == "CORE" and metric_rows[-2:] == ["ChatCORE (6 tasks)", "ChatCORE (5 tasks)"]
    # wall clock runs to the last stage, RL included (the reference stopped at the last non-RL section)
    assert "Total wall clock time: 6h13m" in text
    assert "| Chat RL | 2025-10-27 04:54:38 | 0h30m |" in text  # per-stage timeline
    # plots exist next to report.md and are embedded
    for name in ("base-training-vs-step.png", "base-training-vs-flops.png"):
        assert (report_dir / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert (report_dir / "base-training-vs-step.png").read_bytes()[:4] == b"\x89PNG"
    # the copy in the cwd points at the plots by absolute path
    copy = (tmp_path / "report.md").read_text()
    assert f"]({report_dir / 'base-training-vs-step.png'})" in copy
    # reset clears the old run
    r.reset()
    assert sorted(os.listdir(report_dir)) == ["header.md"]


def test_generate_without_reset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = Report(str(tmp_path / "rep"))
    r.log("Chat SFT", [{"Number of iterations": 3}])
    r.generate()
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Chat SFT" in text and "Total wall clock time: unknown" in text and "[bloat data missing]" in text
    assert "Did you forget to run" in capsys.readouterr().out


def test_history_keeps_the_standard_error_and_plots_its_band(tmp_path, monkeypatch):
    import matplotlib.axes
    r = Report(str(tmp_path))
    stored = json.loads(Path(r.log_history("base-training", fake_history())).read_text())["history"]
    assert stored["val"][0] == {"step": 0, "val_bpb": 2.0, "val_bpb_se": 0.01, "flops": 1e12}
    assert "loss_se" not in stored["train"][0]  # a value without a standard error stays without
    bands = []
    original = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lower, upper, **kw: bands.append((list(x), lower, upper)) or original(
                            self, x, lower, upper, **kw))
    assert report_mod.plot_history("base-training", stored, str(tmp_path))
    assert bands[0] == ([0, 2, 4], pytest.approx([1.99, 1.79, 1.59]), pytest.approx([2.01, 1.81, 1.61]))  # vs step


def test_bad_history_is_rejected(tmp_path):
    r = Report(str(tmp_path))
    with pytest.raises(ValueError, match="val_bpb"):
        r.log_history("x", {"val": [{"step": 1}]})


def test_get_report_rank0_and_dummy(base_dir, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    r = get_report()
    assert isinstance(r, Report) and r.report_dir == str(base_dir / "report")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d = get_report()
    assert isinstance(d, DummyReport)
    d.log("x", [{"a": 1}])
    d.log_history("x", fake_history())
    d.reset()
    d.generate()
    assert not (base_dir / "report" / "x.md").exists()


def run_cli(args, base_dir, cwd):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "nanochat.report", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_reset_generate(base_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    report_mod.main(["reset"])
    assert (base_dir / "report" / "header.md").is_file()
    Report(str(base_dir / "report")).log("Base model evaluation", [{"CORE metric": 0.2219}])
    result = run_cli([], base_dir, work)  # the real command line; default command is generate
    assert result.returncode == 0, result.stderr
    text = (work / "report.md").read_text()
    assert "| CORE" in text and "0.2219" in text
    with pytest.raises(SystemExit) as e:
        report_mod.main(["bogus"])
    assert e.value.code != 0


def test_summary_table_widths():
    table = report_mod.summary_table({"BASE": {"CORE": "0.1"}, "SFT": {"MMLU": "0.25", "ChatCORE (5 tasks)": "0.01"},
                                      "RL": {}})
    lines = table.splitlines()
    assert lines[0] == "| Metric             | BASE     | SFT      | RL       |"
    assert lines[1] == "|--------------------|----------|----------|----------|"
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["CORE", "MMLU", "ChatCORE (5 tasks)"]


def test_bloat_counts_the_main_lock_not_an_extras(tmp_path, monkeypatch):
    from nanochat import report
    monkeypatch.chdir(tmp_path)
    (tmp_path / "requirements.lock").write_text("a==1\nb==2\nc==3\n")
    (tmp_path / "requirements-gpu.lock").write_text("kernels==1\n")  # sorts first, but is an optional extra's
    assert "- Dependencies (requirements.lock lines): 3" in report.bloat_lines()
