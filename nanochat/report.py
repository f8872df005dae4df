"""
The run report: every stage writes a markdown fragment into <base_dir>/report/, and `generate` stitches them into
report.md with an environment header, training-curve plots and a summary table of metrics per stage.

    python -m nanochat.report reset      # at the start of a run: clear old fragments, write the header
    python -m nanochat.report generate   # at the end: write report.md (+ plots) and copy it to the current directory

In code: get_report().log("Base model training", [config_dict, {"Minimum validation bpb": 0.95}, "free text\\n"])
         get_report().log_history("base-training", {"train": [{"step", "loss", "flops"}...],
                                                    "val": [{"step", "val_bpb", "val_bpb_se", "flops"}...]})
Only rank 0 writes; other ranks get a DummyReport whose methods do nothing.

The wall-clock total runs to the last stage that finished, RL included; metrics are read from "- key: value" lines by
exact key (so e.g. "task_name: GSM8K" is never taken for a GSM8K score); a cost estimate is computed from the hourly
rate and wall clock.
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import psutil
import torch

from nanochat.cli import run
from nanochat.common import NoOp, atomic_write, get_base_dir, get_dist_info

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

# Sections in report order, as the stages log them; each is stored as the fragment <slug>.md
SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model evaluation",
            "Chat evaluation base", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
EXPECTED_FILES = [section.lower().replace(" ", "-") + ".md" for section in SECTIONS]
OPTIONAL_FILES = {"chat-evaluation-base.md", "chat-rl.md", "chat-evaluation-rl.md"}  # no warning when absent

# Summary table: which stage (column) each fragment feeds, and which "- key: value" lines become which metric row.
STAGES = ["BASE", "SFT", "RL"]
CHAT_METRICS = {"ARC-Easy": "ARC-Easy", "ARC-Challenge": "ARC-Challenge", "MMLU": "MMLU", "GSM8K": "GSM8K",
                "HumanEval": "HumanEval", "SpellingBee": "SpellingBee", "ChatCORE metric": "ChatCORE (6 tasks)",
                "ChatCORE-5 metric": "ChatCORE (5 tasks)"}
METRICS_OF_FILE = {  # fragment -> (stage, {key in the fragment: metric row})
    "base-model-training.md": ("BASE", {"Final validation bpb": "val bpb"}),
    "base-model-evaluation.md": ("BASE", {"CORE metric": "CORE", "val bpb": "val bpb"}),
    "chat-evaluation-base.md": ("BASE", CHAT_METRICS),
    "chat-evaluation-sft.md": ("SFT", CHAT_METRICS),
    "chat-evaluation-rl.md": ("RL", CHAT_METRICS),
}
LAST_ROWS = ("ChatCORE (6 tasks)", "ChatCORE (5 tasks)")
GPU_HOURLY_RATES = {"H100": 3.00, "A100": 1.79, "V100": 0.55}  # USD per GPU-hour (Lambda Cloud list prices)
DEFAULT_GPU_HOURLY_RATE = 2.00
BLOAT_EXTENSIONS = (".py", ".md", ".rs", ".html", ".toml", ".sh")


def slugify(text):
    return text.lower().replace(" ", "-")


def now():
    return datetime.datetime.now().strftime(TIMESTAMP_FORMAT)


def write_text(path, content):
    atomic_write(path, lambda f: f.write(content), mode="w")


def format_value(value):
    """Floats with 4 decimals, large ints with thousands separators, everything else (bools too) str()."""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    # one item per line: newlines inside values (e.g. model samples) are shown escaped, so they can neither break
    # the list nor be mistaken for other "- key: value" lines when metrics are read back
    return str(value).replace("\r", "\\r").replace("\n", "\\n")


# -----------------------------------------------------------------------------
# Environment header


def run_command(cmd, cwd=None):
    """Stripped stdout on success ('' if none), None on failure/timeout."""
    try:
        result = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=5, cwd=cwd)
    except (subprocess.SubprocessError, OSError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def count_bytes_and_lines(path):
    data = Path(path).read_bytes()
    return len(data), data.count(b"\n")


def bloat_lines():
    """Size of the git-tracked source: characters (bytes), lines, files, approx tokens, lock-file lines."""
    listing = run_command("git ls-files")
    files = [f for f in (listing or "").splitlines() if f.endswith(BLOAT_EXTENSIONS) and os.path.isfile(f)]
    sizes = [count_bytes_and_lines(path) for path in files]
    num_chars, num_lines = sum(c for c, _ in sizes), sum(n for _, n in sizes)
    # the dependency lock file of the current directory: uv.lock, else ours (requirements.lock, not an extra's lock),
    # else the first other *.lock
    lock_names = ["uv.lock", "requirements.lock"] + sorted(n for n in os.listdir(".") if n.endswith(".lock"))
    lock_file = next((name for name in lock_names if os.path.isfile(name)), None)
    dep_lines = count_bytes_and_lines(lock_file)[1] if lock_file else 0
    return [f"- Characters: {num_chars:,}", f"- Lines: {num_lines:,}", f"- Files: {len(files):,}",
            f"- Tokens (approx): {num_chars // 4:,}", f"- Dependencies ({lock_file or 'uv.lock'} lines): {dep_lines:,}"]


def generate_header():
    status = run_command("git status --porcelain")
    dirty = "unknown" if status is None else ("dirty" if status else "clean")
    message = (run_command("git log -1 --pretty=%B") or "").split("\n")[0][:80]
    lines = ["# nanochat training report", "", f"Generated: {now()}", "", "## Environment", "",
             "### Git Information",
             f"- Branch: {run_command('git rev-parse --abbrev-ref HEAD') or 'unknown'}",
             f"- Commit: {run_command('git rev-parse --short HEAD') or 'unknown'} ({dirty})",
             f"- Message: {message}", "",
             "### Hardware",
             f"- Platform: {platform.system()}",
             f"- CPUs: {psutil.cpu_count(logical=False) or os.cpu_count()} cores "
             f"({psutil.cpu_count(logical=True) or os.cpu_count()} logical)",
             f"- Memory: {psutil.virtual_memory().total / 1024**3:.1f} GB"]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        memory = sum(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        # the machine's hourly rate, priced by its first GPU
        per_gpu = next((rate for key, rate in GPU_HOURLY_RATES.items() if key in names[0]), DEFAULT_GPU_HOURLY_RATE)
        lines += [f"- GPUs: {count}x {', '.join(sorted(set(names)))}",
                  f"- GPU Memory: {memory / 1024**3:.1f} GB total",
                  f"- CUDA Version: {torch.version.cuda or 'unknown'}",
                  f"- Hourly Rate: ${per_gpu * count:.2f}/hour"]
    else:
        lines.append("- GPUs: None available")
    lines += ["", "### Software", f"- Python: {platform.python_version()}", f"- PyTorch: {torch.__version__}", "",
              "### Bloat", *bloat_lines(), ""]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Reading fragments back


def parse_timestamp(text):
    try:
        return datetime.datetime.strptime(text.strip(), TIMESTAMP_FORMAT)
    except ValueError:
        return None


def find_line(pattern, text):
    """Group 1 of the first line that matches pattern, or ''."""
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1) if match else ""


def fragment_items(content):
    """'- key: value' lines -> {key: value} (later lines win)."""
    items = {}
    for line in content.splitlines():
        if line.startswith("- ") and ":" in line:
            key, value = line[2:].split(":", 1)
            items[key.strip()] = value.strip()
    return items


def extract_metrics(file_name, content):
    keys = METRICS_OF_FILE[file_name][1] if file_name in METRICS_OF_FILE else {}
    items = fragment_items(content)
    return {row: items[key] for key, row in keys.items() if key in items}


def format_duration(seconds):
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{(seconds % 3600) // 60}m"


def summary_table(metrics):
    """metrics: {stage: {row: value}} -> markdown table, CORE first, ChatCORE last, others alphabetical."""
    rows = set().union(*metrics.values())
    first = [r for r in ("CORE", "val bpb") if r in rows]
    last = [r for r in LAST_ROWS if r in rows]
    ordered = first + sorted(rows - set(first) - set(last)) + last
    width = max([15] + [len(r) for r in ordered])
    cell_width = max([8] + [len(v) for m in metrics.values() for v in m.values()])
    header = f"| {'Metric':<{width}} |" + "".join(f" {s:<{cell_width}} |" for s in STAGES)
    separator = f"|{'-' * (width + 2)}|" + "".join(f"{'-' * (cell_width + 2)}|" for _ in STAGES)
    lines = [header, separator]
    for row in ordered:
        cells = "".join(f" {metrics.get(s, {}).get(row, '-'):<{cell_width}} |" for s in STAGES)
        lines.append(f"| {row:<{width}} |{cells}")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Training-curve plots


def plot_history(name, history, out_dir):
    """Write <name>-vs-step.png and <name>-vs-flops.png (train loss and val bpb side by side). -> file names."""
    import matplotlib  # here, not at the top: it is slow to import and only `generate` plots
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    panels = [("train", "loss", "train loss"), ("val", "val_bpb", "val bpb")]
    for x_key, x_label, suffix in (("step", "step", "vs-step"), ("flops", "training FLOPs", "vs-flops")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (split, y_key, title) in zip(axes, panels):
            # NaN/inf are dropped, and on the log FLOPs axis so is step 0 (it has spent 0 FLOPs)
            points = [(r[x_key], r[y_key], r.get(y_key + "_se")) for r in history.get(split, [])
                      if r.get(x_key) is not None and math.isfinite(r[y_key]) and (x_key == "step" or r[x_key] > 0)]
            if points:
                xs, ys, ses = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3)
                if all(se is not None and math.isfinite(se) for se in ses):  # a band of one standard error
                    ax.fill_between(xs, [y - se for y, se in zip(ys, ses)], [y + se for y, se in zip(ys, ses)],
                                    alpha=0.3, label="± 1 standard error")
                    ax.legend(fontsize=8)
                if x_key == "flops":
                    ax.set_xscale("log")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set(xlabel=x_label, ylabel=title, title=f"{name}: {title} vs {x_label}")
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        if any(ax.lines for ax in axes):  # no file for a history without any points
            file_name = f"{slugify(name)}-{suffix}.png"
            atomic_write(os.path.join(out_dir, file_name), lambda f: fig.savefig(f, dpi=100, format="png"))
            written.append(file_name)
        plt.close(fig)
    return written


# -----------------------------------------------------------------------------
# The report


class Report:
    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def log(self, section, data):
        """Write one stage's fragment <slug>.md (overwrites). data: list of dicts (as '- key: value') and strings."""
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        parts = [f"## {section}\n", f"timestamp: {now()}\n", "\n"]
        for item in filter(None, data):  # empty dicts and None are left out
            if isinstance(item, str):
                parts.append(item)
            else:
                parts += [f"- {key}: {format_value(value)}\n" for key, value in item.items()]
        parts.append("\n")
        write_text(path, "".join(parts))
        return path

    def log_history(self, name, history):
        """Store a training history (train loss / val bpb vs step and FLOPs) for the plots made by generate().
        Entries are stored as plain numbers, with the value's standard error (e.g. val_bpb_se) when they have one;
        ValueError names an entry without step or value."""
        clean = {}
        for split, value_key in (("train", "loss"), ("val", "val_bpb")):
            clean[split] = []
            for row in history.get(split, []):
                if not isinstance(row, dict) or "step" not in row or value_key not in row:
                    raise ValueError(f"each history[{split!r}] entry needs 'step' and {value_key!r} (got {row!r})")
                entry = {"step": int(row["step"]), value_key: float(row[value_key]),
                         "flops": None if row.get("flops") is None else float(row["flops"])}
                if row.get(value_key + "_se") is not None:
                    entry[value_key + "_se"] = float(row[value_key + "_se"])
                clean[split].append(entry)
        path = os.path.join(self.report_dir, f"history-{slugify(name)}.json")
        write_text(path, json.dumps({"name": name, "history": clean}))
        return path

    def reset(self):
        """Start a new run: delete this directory's fragments, histories and plots, write header.md."""
        for name in os.listdir(self.report_dir):
            if name.endswith((".md", ".png")) or (name.startswith("history-") and name.endswith(".json")):
                os.remove(os.path.join(self.report_dir, name))
        header = generate_header() + f"Run started: {now()}\n\n---\n\n"
        write_text(os.path.join(self.report_dir, "header.md"), header)
        print(f"Reset report and wrote header to {os.path.join(self.report_dir, 'header.md')}")

    def generate(self):
        """Write report.md (header, stage sections, plots, summary) and copy it to the current directory."""
        report_file = os.path.join(self.report_dir, "report.md")
        print(f"Generating report to {report_file}")
        header_file = os.path.join(self.report_dir, "header.md")
        header = ""
        if os.path.isfile(header_file):
            header = Path(header_file).read_text()
        else:
            print(f"Warning: {header_file} does not exist. Did you forget to run `python -m nanochat.report reset`?")
        parts = [header]
        start_time = parse_timestamp(find_line(r"^Run started: (.*)$", header))

        metrics = {stage: {} for stage in STAGES}
        timeline = []  # (stage title, timestamp)
        for file_name in EXPECTED_FILES:
            path = os.path.join(self.report_dir, file_name)
            if not os.path.isfile(path):
                if file_name not in OPTIONAL_FILES:
                    print(f"Warning: {file_name} does not exist, skipping")
                continue
            content = Path(path).read_text()
            parts.append(content.rstrip("\n") + "\n\n")
            stamp = parse_timestamp(find_line(r"^timestamp:(.*)$", content))
            if stamp is not None:
                timeline.append((content.splitlines()[0].lstrip("# ").strip(), stamp))
            if file_name in METRICS_OF_FILE:
                # files come in run order, the only row two files of a stage share is val bpb, and base-model
                # evaluation's (later) beats the training-time one
                metrics[METRICS_OF_FILE[file_name][0]].update(extract_metrics(file_name, content))

        # plots of the training histories, written next to report.md
        plot_files = []
        for name in sorted(os.listdir(self.report_dir)):
            if name.startswith("history-") and name.endswith(".json"):
                record = json.loads(Path(self.report_dir, name).read_text())
                plot_files += plot_history(record["name"], record["history"], self.report_dir)
        if plot_files:
            parts += ["## Training curves\n\n"] + [f"![{f[:-4]}]({f})\n\n" for f in plot_files]

        # summary: bloat, metrics table, timeline, wall clock, cost
        bloat = re.search(r"### Bloat\n(.*?)\n\n", header, re.DOTALL)
        parts += ["## Summary\n\n", (bloat.group(1) + "\n" if bloat else "[bloat data missing]\n") + "\n",
                  summary_table(metrics) + "\n"]
        if timeline and start_time is not None:
            parts.append("| Stage | Finished | Since previous |\n|---|---|---|\n")
            previous = start_time
            for title, stamp in sorted(timeline, key=lambda t: t[1]):
                parts.append(f"| {title} | {stamp.strftime(TIMESTAMP_FORMAT)} | "
                             f"{format_duration((stamp - previous).total_seconds())} |\n")
                previous = stamp
            elapsed = (previous - start_time).total_seconds()  # the wall clock runs to the last stage that finished
            parts.append(f"\nTotal wall clock time: {format_duration(elapsed)}\n")
            rate = find_line(r"^- Hourly Rate: \$([0-9.]+)/hour", header)
            if rate:
                parts.append(f"Estimated cost: ${float(rate) * elapsed / 3600:.2f} (hourly rate x wall clock)\n")
        else:
            parts.append("Total wall clock time: unknown\n")

        text = "".join(parts)
        write_text(report_file, text)
        # the copy in the current directory links to the plots where they are (absolute paths)
        cwd_copy = os.path.join(os.getcwd(), "report.md")
        if os.path.abspath(cwd_copy) != os.path.abspath(report_file):
            for f in plot_files:
                text = text.replace(f"]({f})", f"]({os.path.join(os.path.abspath(self.report_dir), f)})")
            write_text(cwd_copy, text)
            print(f"Copying report.md to current directory for convenience: {cwd_copy}")
        return report_file


class DummyReport(NoOp):
    """What non-zero ranks get: every method is a no-op."""


def get_report():
    _, rank, _, _ = get_dist_info()
    return Report(os.path.join(get_base_dir(), "report")) if rank == 0 else DummyReport()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate or reset the nanochat training report")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"],
                        help="reset at the start of a run, generate at the end")
    args = parser.parse_args(argv)
    getattr(get_report(), args.command)()  # Report.generate() or Report.reset()


if __name__ == "__main__":
    run(main)
