"""
scripts/ab_test (the A/B tool for recipes): the t distribution against closed forms and tables, Welch's test on
simulated arms (how often equal arms come out "significant", and that a real difference is found), the report on
summaries made elsewhere (both arms, B - A with its interval and p-value, the plot, one run per arm, zero spread,
bad input), and runs/ab.sh training two tiny CPU recipes for 2 seeds each.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat.cli import run
from scripts import ab_test
from scripts.ab_test import incomplete_beta, t_cdf, t_quantile, t_two_sided_p, welch, welch_interval

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_t_distribution_matches_known_values():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b, on both sides of the continued fraction's switch point
    for x in (0.01, 0.3, 0.7, 0.99):
        assert math.isclose(incomplete_beta(x, 2.5, 1), x ** 2.5, rel_tol=1e-12)
        assert math.isclose(incomplete_beta(x, 1, 3.5), 1 - (1 - x) ** 3.5, rel_tol=1e-12)
    assert incomplete_beta(0.0, 2, 3) == 0.0 and incomplete_beta(1.0, 2, 3) == 1.0
    # df = 1 is the Cauchy distribution, df = 2 has a closed form
    for t in (-40.0, -3.0, -0.5, 0.0, 0.7, 5.0, 1e3):
        assert math.isclose(t_cdf(t, 1), 0.5 + math.atan(t) / math.pi, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(t_cdf(t, 2), 0.5 + t / (2 * math.sqrt(2 + t * t)), rel_tol=1e-12, abs_tol=1e-15)
    # two-sided 95% critical values of the textbook tables; a huge df is the normal distribution
    for df, critical in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (10, 2.2281), (30, 2.0423),
                         (1e7, 1.95996)):
        assert abs(t_quantile(0.975, df) - critical) < 5e-5, df
        assert math.isclose(t_two_sided_p(critical, df), 0.05, rel_tol=2e-4)
    assert math.isclose(t_quantile(0.995, 4), 4.6041, rel_tol=2e-5)
    # Welch's degrees of freedom are real numbers: the CDF is continuous and monotone between integer df
    assert t_quantile(0.975, 2) > t_quantile(0.975, 2.5) > t_quantile(0.975, 3)
    assert t_two_sided_p(0.0, 3) == 1.0 and t_two_sided_p(math.inf, 3) == 0.0


def test_equal_arms_come_out_significant_at_most_5_percent_of_the_time():
    """Equal arms drawn 2000 times: p < 0.05 at most 5% of the time (Welch is a little conservative at 2-3 runs per
    arm, near exact at 6; so the 95% interval, which excludes 0 exactly when p < 0.05, covers the true difference at
    least 95% of the time), and a real difference of 3 noise sigmas with 5 runs per arm is found."""
    rng = np.random.default_rng(0)
    draws = 2000
    tolerance = 3 * math.sqrt(0.05 * 0.95 / draws)  # 3 binomial standard deviations of a 5% rate
    for n_a, n_b, sigma_a, sigma_b in ((2, 2, 1, 1), (3, 3, 1, 1), (2, 4, 1, 3), (6, 6, 1, 1)):
        tests = [welch(list(rng.normal(0, sigma_a, n_a)), list(rng.normal(0, sigma_b, n_b))) for _ in range(draws)]
        significant = sum(p < 0.05 for _, _, _, p in tests) / draws
        assert significant <= 0.05 + tolerance, (n_a, n_b, significant)
        if n_a == 6:
            assert abs(significant - 0.05) <= tolerance, significant
        for difference, se, df, p in tests[:50]:
            assert (abs(difference) > welch_interval(se, df)) == (p < 0.05)
    found = 0
    for _ in range(draws):
        difference, _, _, p = welch(list(rng.normal(0, 1, 5)), list(rng.normal(-3, 1, 5)))
        found += p < 0.05 and difference < 0
    assert found / draws > 0.9, found / draws


def test_zero_spread_is_exact():
    assert welch([1.0, 1.0], [1.0, 1.0, 1.0]) == (0.0, 0.0, math.inf, 1.0)
    difference, se, _, p = welch([1.0, 1.0], [0.5, 0.5])
    assert difference == -0.5 and se == 0.0 and p == 0.0 and welch_interval(se, math.inf) == 0.0
    difference, se, df, p = welch([1.0, 1.0, 1.0], [0.5, 0.7, 0.6])  # one arm without spread: df = n_b - 1
    assert math.isclose(df, 2.0) and p < 0.05 and math.isclose(welch_interval(se, df), 4.3027 * 0.1 / 3 ** 0.5,
                                                                   rel_tol=1e-4)

# -----------------------------------------------------------------------------
# The report, on summaries made elsewhere


def fake_run(path, seed, val_bpb, core=None, curve=None, **extra):
    path.mkdir(parents=True)
    summary = {"val_bpb": val_bpb, "core_score": core, "seed": seed, "total_batch_size": 256,
               "val_curve": curve or [[0, 3.0], [5, 2.0], [10, val_bpb]], **extra}
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def run_tool(capsys, *argv):
    """The tool in-process, as its command line runs it: (exit code, stdout, stderr)."""
    try:
        code = run(lambda: ab_test.main(list(argv)))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code or 0, out, err


def test_compares_runs_made_elsewhere(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    a = [fake_run(tmp_path / f"a{s}", s, bpb, core=c, val_bpb_se=0.002, val_tokens=65536)
         for s, bpb, c in ((42, 1.010, 0.11), (43, 1.012, 0.12), (44, 1.008, 0.10))]
    b = [fake_run(tmp_path / f"b{s}", s, bpb, core=c, val_bpb_se=0.002, val_tokens=65536)
         for s, bpb, c in ((42, 0.990, 0.12), (43, 0.993, 0.11), (44, 0.991, 0.13))]
    code, out, err = run_tool(capsys, "--a-runs", *a, "--b-runs", *b[:2], b[2] + "/summary.json")
    assert code == 0 and err == "", err
    assert "val bpb (lower is better; evaluated on 65,536 tokens):" in out
    rows = [line for line in out.splitlines() if line.startswith(("A ", "B "))]
    # A: mean 1.010, sd 0.002, 95% half-width t(2) x 0.002 / sqrt(3) = 4.3027 x 0.001155 = 0.0050; eval se 0.002
    assert rows[0].split() == ["A", "3", "42,43,44", "1.0100", "±", "0.0050", "1.0100", "1.0120", "1.0080", "0.0020"]
    # B - A = -0.01867; se sqrt(0.002^2/3 + 0.001528^2/3) = 0.001453; Welch df 3.74; t = -12.8; p = 3.1e-4
    verdict = next(line for line in out.splitlines() if line.startswith("val bpb: B - A"))
    assert verdict.startswith("val bpb: B - A = -0.0187 ± 0.0041 (95%, Welch df 3.7), p = 0.000313: "), verdict
    assert verdict.endswith("B is better (lower val bpb)")
    core = next(line for line in out.splitlines() if line.startswith("CORE: B - A"))
    assert core.startswith("CORE: B - A = +0.0100 ± ") and core.endswith("no significant difference at p < 0.05")
    plot = tmp_path / "base" / "ab_results" / "ab" / "ab.png"
    assert plot.read_bytes()[:4] == b"\x89PNG" and f"Plot saved to: {plot}" in out


def test_one_run_per_arm_and_missing_core_are_clear_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    a = fake_run(tmp_path / "a", 42, 1.0, core=0.1)
    b = [fake_run(tmp_path / "b42", 42, 0.9), fake_run(tmp_path / "b43", 43, 0.95)]
    code, out, err = run_tool(capsys, "--a-runs", a, "--b-runs", *b)
    assert code == 0 and "Traceback" not in err
    assert ("val bpb: B - A = -0.0750, no interval and no p-value: arm A has 1 run, at least 2 per arm are needed "
            "(run more seeds)") in out
    assert "CORE: in 1 of 3 runs' summaries only, not compared" in out


def test_identical_runs_warn_that_chance_cannot_be_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    a = [fake_run(tmp_path / f"a{s}", 42, 1.0) for s in (1, 2)]
    b = [fake_run(tmp_path / f"b{s}", s, 1.0) for s in (42, 43)]
    code, out, _ = run_tool(capsys, "--a-runs", *a, "--b-runs", *b)
    assert code == 0
    assert "WARNING: arm A has seed 42 2 times" in out and "WARNING: every run of each arm gave the same number" in out
    assert "val bpb: B - A = +0.0000 ± 0.0000 (95%, Welch df inf), p = 1: no significant difference at p < 0.05" in out


@pytest.mark.parametrize("argv,needle", [
    ([], "give either --a and --b"),
    (["--a=--depth=4"], "give both --a and --b"),
    (["--a=", "--b=", "--a-runs", "x"], "give either --a and --b"),
    (["--a=--seed=3", "--b="], "--a sets --seed: the A/B tool gives every run its own --seed and --model-tag"),
    (["--a=", "--b=", "--common=--depth=4 --model-tag x"], "--common sets --model-tag"),
    (["--a=", "--b=", "--seeds=0"], "--seeds=0 must be at least 1"),
    (["--a=", "--b=", "--name=../up"], "--name='../up' must be a plain name"),
    (["--a-runs", "nowhere", "--b-runs", "nowhere"], "cannot read nowhere ([Errno 2] No such file or directory: "
                                                     "'nowhere'); only a finished base_train run writes it"),
])
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    code, out, err = run_tool(capsys, *argv)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "base" / "ab_results").exists()  # nothing trained, nothing written


def test_summary_without_val_bpb_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    a = fake_run(tmp_path / "a", 42, None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text("{not json")
    code, _, err = run_tool(capsys, "--a-runs", a, "--b-runs", a)
    assert code == 1 and err.startswith("error: ") and "has no val_bpb" in err
    code, _, err = run_tool(capsys, "--a-runs", str(tmp_path / "b"), "--b-runs", a)
    assert code == 1 and err.startswith("error: cannot read ") and "summary.json (Expecting property name" in err


def test_the_tool_never_imports_torch():
    """It only launches runs and reads their summaries; torch would start CUDA in the parent of GPU runs."""
    proc = subprocess.run([sys.executable, "-c", "import sys, scripts.ab_test; print('torch' in sys.modules)"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr

# -----------------------------------------------------------------------------
# runs/ab.sh end to end: two tiny recipes, 2 seeds each, on CPU


@pytest.mark.slow
def test_ab_sh_trains_two_tiny_recipes(tmp_path, tiny_tokenizer):
    from test_base_train import build_base_dir
    base = tmp_path / "base"
    build_base_dir(str(base), tiny_tokenizer)
    common = ("--depth=2 --aspect-ratio=32 --head-dim=32 --max-seq-len=64 --device-batch-size=2 "
              "--total-batch-size=128 --num-iterations=4 --eval-every=2 --eval-tokens=256 --core-metric-every=-1 "
              "--sample-every=-1 --warmup-steps=0 --window-pattern=SL")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATASET="local", SKIP_SETUP="1", NPROC_PER_NODE="1",
               OMP_NUM_THREADS="1", NANOCHAT_DTYPE="float32", SEEDS="2", COMMON=common, A="--matrix-lr=0.02",
               B="--matrix-lr=0.04 --embedding-lr=1.2", PYTHONPATH=str(REPO_ROOT),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO_ROOT / "runs" / "ab.sh"), "tiny"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # alternating arms, each run its own seed and tag
    order = [line.split(":")[0] for line in out.splitlines() if line.startswith("[")][1:]
    assert order == ["[1/4] A seed 42", "[2/4] B seed 42", "[3/4] A seed 43", "[4/4] B seed 43"], out
    for arm in "ab":
        for seed in (42, 43):
            summary = json.loads((base / "base_checkpoints" / f"ab_tiny_{arm}_s{seed}" / "summary.json").read_text())
            assert summary["seed"] == seed and [step for step, _ in summary["val_curve"]] == [0, 2, 4]
    rows = [line for line in out.splitlines() if line.startswith(("A ", "B "))]
    assert len(rows) == 2 and all(" 42,43 " in row and " ± " in row for row in rows), out
    verdict = [line for line in out.splitlines() if line.startswith("val bpb: B - A = ")]
    assert len(verdict) == 1 and " ± " in verdict[0] and "(95%, Welch df " in verdict[0] and ", p = " in verdict[0]
    assert verdict[0].endswith(("B is better (lower val bpb)", "A is better (lower val bpb)",
                                "no significant difference at p < 0.05")), verdict[0]
    assert (base / "ab_results" / "tiny" / "ab.png").read_bytes()[:4] == b"\x89PNG"
    assert (base / "ab_results" / "tiny" / "ab_tiny_b_s43.log").stat().st_size > 0
    # a recipe base_train refuses stops the test at its first run, naming the arm, the seed and the log
    env.update(A="--head-dim=7")
    proc = subprocess.run(["bash", str(REPO_ROOT / "runs" / "ab.sh"), "bad"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr
    assert last.startswith("error: A seed 42 failed (exit 1): error: --head-dim=7"), last
    assert "ab_results/bad/ab_bad_a_s42.log" in last and "[2/4]" not in proc.stdout
