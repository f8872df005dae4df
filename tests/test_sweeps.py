"""
Sweep workflows: scripts/sweep_results.py (CSV rows from summary.json, skip-if-done, table, plots) with fake summaries,
and runs/miniseries.sh + runs/scaling_laws.sh end to end in a tiny CPU configuration (2 depths, a few steps).
"""

import csv
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP = REPO_ROOT / "scripts" / "sweep_results.py"


def _load_sweep_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep_results", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_results = _load_sweep_module()


def run_sweep_tool(*args, check=True):
    """Run scripts/sweep_results.py in-process (like its CLI: exit code, stdout, stderr), much faster than a subprocess."""
    import contextlib
    import io
    import types
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = sweep_results.main([str(a) for a in args])
    proc = types.SimpleNamespace(returncode=code or 0, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"sweep_results {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_cli_runs_as_the_sweeps_call_it(tmp_path):
    def run(csv):
        return subprocess.run([sys.executable, "-m", "scripts.sweep_results", "done", "--kind", "miniseries", "--csv",
                               str(csv), "--depth", "3"], cwd=REPO_ROOT, capture_output=True, text=True)
    proc = run(tmp_path / "none.csv")
    assert proc.returncode == 1 and proc.stderr == ""  # not done yet: exit 1, silently
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    proc = run(tmp_path / "foreign.csv")  # bad input: one error line, exit 1
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.perf
def test_the_tool_never_imports_torch():
    """The sweeps call it twice per training run: importing torch would cost seconds each time."""
    proc = subprocess.run([sys.executable, "-c", "import sys, scripts.sweep_results; print('torch' in sys.modules)"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def fake_summary(path, depth, val_bpb, core=0.1, flops=1e15, se=0.002):
    """A summary.json shaped like the one base_train writes (param groups and standard errors included)."""
    dim = depth * 64
    groups = {"wte": 512 * dim, "value_embeds": 512 * dim * (depth // 2), "lm_head": 512 * dim,
              "transformer_matrices": 12 * depth * dim * dim, "scalars": 2 * depth}
    groups["total"] = sum(groups.values())
    scaling = groups["transformer_matrices"] + groups["lm_head"]
    summary = {"depth": depth, "model_dim": dim, "num_params": groups["total"], "num_scaling_params": scaling,
               "param_counts": groups, "num_iterations": 100 * depth, "tokens_trained": 100 * depth * 4096,
               "param_data_ratio": 100 * depth * 4096 / scaling, "total_training_flops": flops,
               "val_bpb": val_bpb, "core_score": core, "train_time_sec": 12.5 * depth, "min_val_bpb": val_bpb,
               "val_bpb_se": se, "val_tokens": 20971520, "core_score_se": None if core is None or se is None else 5 * se}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    return summary


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_miniseries_rows_table_plot_and_skip(tmp_path):
    results = tmp_path / "s_miniseries_results" / "results.csv"
    for depth, bpb, core in ((4, 1.5, 0.05), (2, 1.8, None)):
        summary = tmp_path / f"d{depth}" / "summary.json"
        expected = fake_summary(summary, depth, bpb, core=core, flops=1e14 * depth)
        assert run_sweep_tool("done", "--kind", "miniseries", "--csv", results, "--depth", depth,
                              check=False).returncode == 1
        out = run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", summary,
                             "--wall-time", 30).stdout
        assert f"Training d={depth}: params={expected['num_params']}" in out
        assert f"val bpb={bpb:.6f} ± 0.002000" in out
        assert run_sweep_tool("done", "--kind", "miniseries", "--csv", results, "--depth", depth).returncode == 0
    rows = read_csv(results)
    with open(results) as f:
        header = f.readline().strip().split(",")
    # the documented columns come first, in the documented order
    assert header[:10] == ["depth", "model_dim", "num_params", "num_scaling_params", "num_iterations",
                           "tokens_trained", "param_data_ratio", "val_bpb", "core_score", "train_time_sec"]
    assert [r["depth"] for r in rows] == ["2", "4"]  # sorted by depth
    d4 = rows[1]
    s4 = json.loads((tmp_path / "d4" / "summary.json").read_text())
    assert int(d4["num_params"]) == s4["num_params"] and int(d4["num_scaling_params"]) == s4["num_scaling_params"]
    assert int(d4["tokens_trained"]) == s4["tokens_trained"] and float(d4["val_bpb"]) == 1.5
    assert float(d4["core_score"]) == 0.05 and rows[0]["core_score"] == ""  # missing CORE stays empty, not 0.0
    # every number with its standard error and the val tokens it covers (extra columns, after the documented ones)
    assert (d4["val_bpb_se"], d4["val_tokens"], d4["core_score_se"]) == ("0.002000", "20971520", "0.010000")
    assert rows[0]["core_score_se"] == ""
    assert float(d4["total_training_flops"]) == 4e14
    # re-appending the same depth replaces the row instead of duplicating it
    fake_summary(tmp_path / "d4" / "summary.json", 4, 1.4)
    run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", tmp_path / "d4" / "summary.json")
    rows = read_csv(results)
    assert len(rows) == 2 and float(rows[1]["val_bpb"]) == 1.4
    plot = tmp_path / "plot.png"
    out = run_sweep_tool("report", "--kind", "miniseries", "--csv", results, "--plot", plot).stdout
    lines = out.splitlines()
    assert lines[0] == "Results:" and lines[1].split()[:3] == ["depth", "model_dim", "num_params"]
    assert lines[2].split()[0] == "2" and lines[3].split()[0] == "4"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_draw_standard_errors_as_error_bars(tmp_path, monkeypatch):
    import matplotlib.axes
    from scripts import sweep_results
    bars = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, yerr=None, **kw: bars.append((list(y), list(yerr))) or original(
                            self, x, y, yerr=yerr, **kw))
    for depth, bpb, se in ((2, 1.8, 0.004), (4, 1.5, None)):  # d4's summary predates standard errors
        summary = fake_summary(tmp_path / f"d{depth}" / "summary.json", depth, bpb, core=0.05, se=se)
        run_sweep_tool("append", "--kind", "miniseries", "--csv", tmp_path / "m.csv", "--summary",
                       tmp_path / f"d{depth}" / "summary.json")
        run_sweep_tool("append", "--kind", "scaling", "--csv", tmp_path / "s.csv", "--summary",
                       tmp_path / f"d{depth}" / "summary.json", "--flops-budget", "1e15")
    assert summary["val_bpb_se"] is None
    sweep_results.plot_miniseries(sweep_results.read_rows(str(tmp_path / "m.csv"), "miniseries"), str(tmp_path / "m.png"))
    # bpb and CORE vs FLOPs, then vs params; no bar (0) where there is no standard error
    assert bars[:2] == [([1.8, 1.5], [0.004, 0.0]), ([0.05, 0.05], [0.02, 0.0])]
    bars.clear()
    sweep_results.plot_scaling(sweep_results.read_rows(str(tmp_path / "s.csv"), "scaling"), str(tmp_path / "s.png"))
    assert bars == [([1.8, 1.5], [0.004, 0.0])]


def test_a_results_file_from_before_the_standard_errors_is_read_and_upgraded(tmp_path):
    from scripts import sweep_results
    old_columns = sweep_results.MINISERIES_COLUMNS[:sweep_results.MINISERIES_COLUMNS.index("val_bpb_se")]
    results = tmp_path / "results.csv"
    results.write_text(",".join(old_columns) + "\n" + ",".join("2" if c == "depth" else "1" for c in old_columns) + "\n")
    assert run_sweep_tool("done", "--kind", "miniseries", "--csv", results, "--depth", 2).returncode == 0
    fake_summary(tmp_path / "d4" / "summary.json", 4, 1.5)
    run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", tmp_path / "d4" / "summary.json")
    rows = read_csv(results)
    assert [r["depth"] for r in rows] == ["2", "4"] and rows[0]["val_bpb_se"] == "" and rows[1]["val_bpb_se"] == "0.002000"


def test_scaling_rows_skip_by_budget_and_fitted_optimum(tmp_path):
    results = tmp_path / "scaling_laws_results_t" / "results.csv"
    # a U-shaped bpb curve per budget so the quadratic fit has an interior minimum
    for budget, shift in (("1e15", 0.0), ("2e15", -0.1)):
        for depth, bpb in ((2, 1.9), (4, 1.6), (6, 1.7)):
            summary = tmp_path / budget / f"d{depth}" / "summary.json"
            fake_summary(summary, depth, bpb + shift, core=None)
            out = run_sweep_tool("append", "--kind", "scaling", "--csv", results, "--summary", summary,
                                 "--flops-budget", budget).stdout
            assert "Params: " in out and "(transformer: " in out
            assert f"WARNING: Could not extract CORE score for d={depth}" in out
    rows = read_csv(results)
    assert len(rows) == 6
    s = json.loads((tmp_path / "1e15" / "d4" / "summary.json").read_text())
    row = [r for r in rows if r["flops_budget"] == "1e15" and r["depth"] == "4"][0]
    assert int(row["params_transformer"]) == s["param_counts"]["transformer_matrices"]
    assert int(row["params_total"]) == s["param_counts"]["total"]
    assert int(row["params_wte"]) == s["param_counts"]["wte"]
    # "done" matches the budget numerically (1e+15 == 1e15) and distinguishes budgets
    assert run_sweep_tool("done", "--kind", "scaling", "--csv", results, "--depth", 4,
                          "--flops-budget", "1e+15").returncode == 0
    assert run_sweep_tool("done", "--kind", "scaling", "--csv", results, "--depth", 4,
                          "--flops-budget", "3e15", check=False).returncode == 1
    plot = tmp_path / "scaling.png"
    out = run_sweep_tool("report", "--kind", "scaling", "--csv", results, "--plot", plot).stdout
    assert "flops_budget" in out and "Optimum per budget" in out
    optimum_lines = [l for l in out.splitlines() if l.startswith("1e+15") or l.startswith("2e+15")]
    assert len(optimum_lines) == 2 and all("n/a" not in l for l in optimum_lines)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs_fail_with_clear_messages(tmp_path):
    results = tmp_path / "r" / "results.csv"
    proc = run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", tmp_path / "nope.json",
                          check=False)
    assert proc.returncode != 0 and "nope.json not found" in proc.stderr
    # a summary older than the run start is stale (training crashed before writing a new one)
    summary = tmp_path / "old" / "summary.json"
    fake_summary(summary, 2, 1.0)
    proc = run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", summary,
                          "--since", time.time() + 100, check=False)
    assert proc.returncode != 0 and "older than this run" in proc.stderr
    # a summary without base_train's keys is refused by name, not guessed around
    foreign = tmp_path / "foreign" / "summary.json"
    foreign.parent.mkdir()
    foreign.write_text(json.dumps({k: v for k, v in fake_summary(summary, 2, 1.0).items() if k != "param_counts"}))
    proc = run_sweep_tool("append", "--kind", "miniseries", "--csv", results, "--summary", foreign, check=False)
    assert proc.returncode != 0 and "has no 'param_counts' entry" in proc.stderr.strip().splitlines()[-1]
    assert not results.exists()
    # a CSV with a foreign header is refused rather than mixed
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("a,b\n1,2\n")
    proc = run_sweep_tool("done", "--kind", "miniseries", "--csv", results, "--depth", 2, check=False)
    assert proc.returncode != 0 and "move the old file aside" in proc.stderr
    proc = run_sweep_tool("report", "--kind", "scaling", "--csv", tmp_path / "none.csv", check=False)
    assert proc.returncode != 0 and "no results yet" in proc.stderr


# -----------------------------------------------------------------------------
# The shell scripts' own logic (arguments, skipping, CSV, table, plot) with a stand-in base_train, in a copy of
# the repo's runs/ and scripts/sweep_results.py, so the real scripts/ is untouched. Fast: no training.

STUB_BASE_TRAIN = r'''
import argparse, json, os, sys
p = argparse.ArgumentParser()
for flag in ("--depth", "--device-batch-size"):
    p.add_argument(flag, type=int)
for flag in ("--run", "--model-tag", "--target-flops", "--eval-tokens"):
    p.add_argument(flag)
args, _ = p.parse_known_args()
base = os.environ["NANOCHAT_BASE_DIR"]
with open(os.path.join(base, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "run": args.run, "tag": args.model_tag,
                        "device_batch_size": args.device_batch_size}) + "\n")
if args.depth == 13:
    sys.exit("stub: simulated crash")
d = args.depth
groups = {"wte": 1000 * d, "value_embeds": 500 * d, "lm_head": 1000 * d, "transformer_matrices": 12000 * d * d,
          "scalars": 2 * d}
groups["total"] = sum(groups.values())
flops = float(args.target_flops) if args.target_flops else 1e12 * d
bpb = 2.0 - 0.1 * d + 0.004 * d * d + (0.0 if not args.target_flops else -0.01 * (flops / 1e12))
out = os.path.join(base, "base_checkpoints", args.model_tag)
os.makedirs(out, exist_ok=True)
json.dump({"depth": d, "model_dim": 64 * d, "num_params": groups["total"],
           "num_scaling_params": groups["transformer_matrices"] + groups["lm_head"], "param_counts": groups,
           "num_iterations": 10, "tokens_trained": 10 * 256, "param_data_ratio": 0.5, "total_training_flops": flops,
           "val_bpb": bpb, "core_score": None, "train_time_sec": 1.0}, open(os.path.join(out, "summary.json"), "w"))
print("stub base_train done")
'''


@pytest.fixture
def stub_repo(tmp_path):
    import shutil
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "runs", repo / "runs")
    (repo / "scripts").mkdir()
    shutil.copy(SWEEP, repo / "scripts" / "sweep_results.py")
    (repo / "scripts" / "__init__.py").write_text("")
    (repo / "scripts" / "base_train.py").write_text(STUB_BASE_TRAIN)
    return repo


def run_script(repo, script, base, env_extra, args=()):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), SKIP_SETUP="1", NPROC_PER_NODE="1", WANDB_RUN="dummy",
               OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               **env_extra)
    return subprocess.run(["bash", str(repo / "runs" / script), *args], capture_output=True, text=True, env=env,
                          cwd=repo)


def calls(base):
    path = base / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_miniseries_script_logic_with_stub_training(stub_repo, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    env = {"DEPTHS": "2,4", "EXTRA_ARGS": "--max-seq-len=64 --device-batch-size=3"}
    proc = run_script(stub_repo, "miniseries.sh", base, env, ["stub"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = base / "stub_miniseries_results"
    rows = read_csv(results / "results.csv")
    assert [r["depth"] for r in rows] == ["2", "4"]
    assert all(r["num_params"] and r["val_bpb"] for r in rows)
    c = calls(base)
    assert [x["tag"] for x in c] == ["stub_miniseries_d2", "stub_miniseries_d4"]
    assert all(x["run"] == "dummy" and x["device_batch_size"] == 3 for x in c)  # EXTRA_ARGS win
    assert "--core-metric-every=999999" in c[0]["argv"] and "--max-seq-len=64" in c[0]["argv"]
    assert (results / "stub_miniseries_d2_train.log").read_text().strip().endswith("stub base_train done")
    assert (results / "miniseries.png").read_bytes()[:4] == b"\x89PNG"
    assert "Results saved to: " in proc.stdout and "Results:" in proc.stdout
    # second run: finished depths are skipped, a new one is trained; default device batch by depth (32 below 20)
    proc = run_script(stub_repo, "miniseries.sh", base, {"DEPTHS": "2 4 6"}, ["stub"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Skipping d=2 (already in results)" in proc.stdout and "Skipping d=4" in proc.stdout
    c = calls(base)
    assert len(c) == 3 and c[-1]["tag"] == "stub_miniseries_d6" and c[-1]["device_batch_size"] == 32
    assert len(read_csv(results / "results.csv")) == 3
    # a failing depth stops the sweep with a clear message; the CSV keeps what finished
    proc = run_script(stub_repo, "miniseries.sh", base, {"DEPTHS": "13 20"}, ["stub"])
    assert proc.returncode != 0 and "ERROR: training d=13 failed" in proc.stdout
    assert len(read_csv(results / "results.csv")) == 3 and calls(base)[-1]["tag"] == "stub_miniseries_d13"


@pytest.mark.slow
def test_scaling_laws_script_logic_with_stub_training(stub_repo, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    env = {"LABEL": "stub", "FLOPS_BUDGETS": "1e12 2e12", "DEPTHS": "4 20", "EVAL_TOKENS": "512"}
    proc = run_script(stub_repo, "scaling_laws.sh", base, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = base / "scaling_laws_results_stub"
    rows = read_csv(results / "results.csv")
    assert [(r["flops_budget"], r["depth"]) for r in rows] == [(b, d) for b in ("1e12", "2e12") for d in ("4", "20")]
    c = calls(base)
    assert c[0]["tag"] == "scaling_1e12_d4" and "--target-flops=1e12" in c[0]["argv"]
    assert "--target-param-data-ratio=-1" in c[0]["argv"] and "--eval-tokens=512" in c[0]["argv"]
    # device batch by depth as the docs: 32 below d20, 16 from d20
    assert [x["device_batch_size"] for x in c[:2]] == [32, 16]
    assert "Optimum per budget" in proc.stdout
    assert (results / "scaling_laws.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "scaling_1e12_d4_train.log").exists()
    proc = run_script(stub_repo, "scaling_laws.sh", base, env)
    assert proc.returncode == 0
    assert proc.stdout.count("(already in results)") == 4 and "Skipping d=20 at 2e12 FLOPs (already in results)" in proc.stdout
    assert len(calls(base)) == 4


# -----------------------------------------------------------------------------
# End to end with the real scripts/base_train.py on CPU: a tiny tokenizer and tiny local shards prepared here,
# then each sweep with 2 depths and a handful of steps, run twice (the second run must skip everything).

TINY_TRAIN_ARGS = ("--aspect-ratio=32 --head-dim=32 --max-seq-len=64 --window-pattern=L --device-batch-size=2 "
                   "--total-batch-size=128 --eval-every=100 --eval-tokens=256 --core-metric-every=-1")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A base dir with local shards built from a small English corpus and a 512-token tokenizer trained on them."""
    from conftest import tiny_corpus
    from nanochat.local_data import write_shards
    base = tmp_path_factory.mktemp("sweep_base")
    write_shards(tiny_corpus(), str(base / "base_data_local"), "local", "tests/conftest.py tiny_corpus")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size=512"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


def run_real(script, base, env_extra, args=()):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", SKIP_SETUP="1",
               NPROC_PER_NODE="1", WANDB_RUN="dummy", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_extra)
    return subprocess.run(["bash", str(REPO_ROOT / "runs" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT)


@pytest.mark.slow
def test_miniseries_end_to_end_on_cpu(tiny_base):
    env = {"DEPTHS": "1 2", "EXTRA_ARGS": TINY_TRAIN_ARGS + " --num-iterations=4"}
    proc = run_real("miniseries.sh", tiny_base, env, ["cpu"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tiny_base / "cpu_miniseries_results"
    rows = read_csv(results / "results.csv")
    assert [r["depth"] for r in rows] == ["1", "2"]
    for row in rows:
        summary = json.loads((tiny_base / "base_checkpoints" / f"cpu_miniseries_d{row['depth']}" /
                              "summary.json").read_text())
        assert int(row["num_params"]) == summary["num_params"] > 0
        assert int(row["num_scaling_params"]) == summary["num_scaling_params"] > 0
        assert int(row["num_iterations"]) == 4 and int(row["tokens_trained"]) == 4 * 128
        assert 0 < float(row["val_bpb"]) < 20 and row["core_score"] == ""
        assert float(row["val_bpb_se"]) == pytest.approx(summary["val_bpb_se"], abs=1e-6) and summary["val_bpb_se"] > 0
        assert int(row["val_tokens"]) == summary["val_tokens"] == 256
        assert int(row["model_dim"]) == summary["model_dim"]
    assert (results / "cpu_miniseries_d1_train.log").stat().st_size > 0
    assert (results / "miniseries.png").read_bytes()[:4] == b"\x89PNG"
    assert "Results:" in proc.stdout and "param_data_ratio" in proc.stdout
    again = run_real("miniseries.sh", tiny_base, env, ["cpu"])
    assert again.returncode == 0
    assert "Skipping d=1 (already in results)" in again.stdout and "Skipping d=2" in again.stdout
    assert "Training d=" not in again.stdout and len(read_csv(results / "results.csv")) == 2


@pytest.mark.slow
def test_scaling_laws_end_to_end_on_cpu(tiny_base):
    # 4e8 FLOPs buys a few steps of 128 tokens for these tiny models; the horizon comes from the budget alone
    env = {"LABEL": "cpu", "FLOPS_BUDGETS": "4e8", "DEPTHS": "1 2", "EVAL_TOKENS": "256",
           "EXTRA_ARGS": TINY_TRAIN_ARGS}
    proc = run_real("scaling_laws.sh", tiny_base, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tiny_base / "scaling_laws_results_cpu"
    rows = read_csv(results / "results.csv")
    assert [(r["flops_budget"], r["depth"]) for r in rows] == [("4e8", "1"), ("4e8", "2")]
    for row in rows:
        summary = json.loads((tiny_base / "base_checkpoints" / f"scaling_4e8_d{row['depth']}" /
                              "summary.json").read_text())
        assert int(row["params_transformer"]) == summary["param_counts"]["transformer_matrices"]
        assert int(row["params_total"]) == summary["param_counts"]["total"]
        assert int(row["num_iterations"]) >= 1 and float(row["val_bpb"]) > 0
        # the budget sets the horizon: spent FLOPs are within one step of it
        assert abs(float(row["total_training_flops"]) - 4e8) <= summary["flops_per_token"] * 128
    assert int(rows[0]["num_iterations"]) > int(rows[1]["num_iterations"])  # smaller model, more steps
    assert (results / "scaling_laws.png").read_bytes()[:4] == b"\x89PNG"
    again = run_real("scaling_laws.sh", tiny_base, env)
    assert again.returncode == 0
    assert "Skipping d=1 at 4e8 FLOPs (already in results)" in again.stdout
    assert "Skipping d=2 at 4e8 FLOPs (already in results)" in again.stdout
    assert len(read_csv(results / "results.csv")) == 2


# -----------------------------------------------------------------------------
# The run scripts only pass flags the stage scripts actually define (a renamed flag would otherwise only show up
# hours into a GPU run).

def launched_modules(script_text):
    """(module, [flags]) for every `-m module ...` launch in a bash script (continuation lines joined)."""
    import re
    text = script_text.replace("\\\n", " ")
    launches = []
    for line in text.splitlines():
        line = line.split(" #")[0]
        for m in re.finditer(r"(?:python|torchrun_m|launch)\s+(?:-m\s+)?((?:scripts|nanochat)\.\w+)(.*)", line):
            launches.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*|-[a-z])(?==|\s|$)", m.group(2))))
    arrays = re.findall(r"BASE_TRAIN_ARGS=\((.*?)\)", text)
    for arr in arrays:
        launches.append(("scripts.base_train", re.findall(r"--[a-z0-9-]+", arr)))
    return launches


@pytest.mark.parametrize("script", ["speedrun.sh", "runcpu.sh", "miniseries.sh", "scaling_laws.sh", "ab.sh"])
def test_run_scripts_use_flags_the_stage_scripts_define(script):
    text = (REPO_ROOT / "runs" / script).read_text()
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "runs" / script)]).returncode == 0
    launches = launched_modules(text)
    assert launches, f"no launches found in {script}"
    for module, flags in launches:
        source_path = REPO_ROOT / (module.replace(".", "/") + ".py")
        assert source_path.exists(), f"{script} launches {module}, which does not exist"
        source = source_path.read_text()
        if "add_model_flags(" in source:  # the model-loading flags are defined once, in nanochat.cli
            from nanochat.cli import add_model_flags
            source += inspect.getsource(add_model_flags)
        for flag in flags:
            assert f'"{flag}"' in source, f"{script}: {module} has no flag {flag}"
    if script == "speedrun.sh":
        modules = [m for m, _ in launches]
        for stage in ("nanochat.report", "nanochat.dataset", "scripts.tok_train", "scripts.tok_eval",
                      "scripts.base_train", "scripts.base_eval", "scripts.chat_sft", "scripts.chat_eval"):
            assert stage in modules, f"speedrun.sh does not run {stage}"
        assert "--fp8" in text and "--target-param-data-ratio=8" in text and "--depth=24" in text
        assert "http" not in text  # no hard-coded download addresses: the modules own them
    if script == "runcpu.sh":
        modules = [m for m, _ in launches]
        for stage in ("nanochat.report", "nanochat.dataset", "scripts.tok_train", "scripts.tok_eval",
                      "scripts.base_train", "scripts.base_eval", "scripts.chat_sft", "scripts.chat_eval",
                      "scripts.chat_cli"):
            assert stage in modules, f"runcpu.sh does not run {stage}"
        assert "scripts.offline_corpus" in text and "set -euo pipefail" in text
