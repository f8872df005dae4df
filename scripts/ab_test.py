"""
A/B test of two base_train recipes: train each for several seeds, then say whether B beats A by more than chance.

    python -m scripts.ab_test --a="--matrix-lr=0.02" --b="--matrix-lr=0.03" --common="--depth=12" --seeds=4
    python -m scripts.ab_test --launcher="torchrun --standalone --nproc_per_node=8" --a=... --b=...
    python -m scripts.ab_test --a-runs DIR [DIR ...] --b-runs DIR [DIR ...]     # runs made elsewhere (e.g. on GPUs)

Training: --seeds runs per arm, seeds 42, 43, ... (42 is base_train's default, so an arm's first run is the recipe as
it runs by default), alternating A and B run by run, so that whatever drifts while the test runs (the load of a
shared machine, a warming GPU) touches both arms alike. Each run is
`<launcher> -m scripts.base_train <common> <arm> --seed=S --model-tag=ab_<name>_<arm>_s<S>`, logged to
<base dir>/ab_results/<name>/, where the plot goes too. A run's --seed changes its weight init and its training data
order; the validation tokens and CORE examples are the same for every run, so every run is measured on one slice.

Either way the numbers come from each run's summary.json beside its checkpoint: val_bpb, core_score, seed and
val_curve, and where base_train wrote them val_bpb_se, val_tokens and core_score_se (the evaluation's own standard
error, shown for scale: the spread over seeds already contains it).

The statistics. Per arm: the mean over its runs ± the 95% interval of Student's t with n - 1 degrees of freedom.
B - A: Welch's two-sided t-test (no equal-variance assumption; Welch-Satterthwaite degrees of freedom) and its 95%
interval. Why Welch rather than a bootstrap or a permutation test: a recipe A/B has few runs per arm (2 to 5, each a
whole training run), and resampling fails exactly there. A bootstrap of 3 values has 10 distinct resamples and
treats their spread as the truth, so its intervals come out too narrow; a permutation test of 2 + 2 runs has 6
splits, so its smallest two-sided p-value is 1/3 and it can never find anything. The t distribution accounts for
the spread itself being estimated from a few runs, and it needs normal noise across seeds, which a final val bpb
(an average over many tokens of a long run) is close to; its p-values are checked against simulated equal arms in
tests/test_ab.py. The test is unpaired: the arms may differ in shape, so one seed need not give both the same init;
where it does (same shape, same seed: runs that move together), the unpaired test errs on the conservative side.

Imports no torch (the parent of the runs should not hold a GPU context), and matplotlib only for the plot.
"""

import os
import re
import sys
import json
import math
import time
import shlex
import argparse
import subprocess

from nanochat.cli import run
from nanochat.errors import NanochatError

FIRST_SEED = 42   # base_train's default seed
ALPHA = 0.05      # significance level; the intervals are 1 - ALPHA = 95%
# (summary key, name, lower is better)
METRICS = [("val_bpb", "val bpb", True), ("core_score", "CORE", False)]


def build_parser():
    parser = argparse.ArgumentParser(description="A/B test of two base_train recipes over several seeds",
                                     epilog='Write the flags with "=": --a="--depth=12 --matrix-lr=0.03" (after a '
                                     "space, argparse would read them as this tool's own flags).")
    parser.add_argument("--a", default=None, help="base_train flags of arm A, one quoted string (train mode)")
    parser.add_argument("--b", default=None, help="base_train flags of arm B, one quoted string (train mode)")
    parser.add_argument("--common", default="", help="base_train flags of both arms, before each arm's own")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm (seeds 42, 43, ...)")
    parser.add_argument("--launcher", default="", help="command before `-m scripts.base_train` (default: this python), "
                        "e.g. 'torchrun --standalone --nproc_per_node=8'")
    parser.add_argument("--a-runs", nargs="+", default=None, help="compare runs made elsewhere: arm A's checkpoint "
                        "dirs (or their summary.json)")
    parser.add_argument("--b-runs", nargs="+", default=None, help="arm B's checkpoint dirs (or their summary.json)")
    parser.add_argument("--name", default="ab", help="name of this test: run tags ab_<name>_*, logs and plot in "
                        "<base dir>/ab_results/<name>/")
    return parser


def check_args(args):
    training, collecting = args.a is not None or args.b is not None, args.a_runs is not None or args.b_runs is not None
    if training == collecting:
        raise NanochatError("give either --a and --b (train both recipes) or --a-runs and --b-runs (compare runs "
                            "made elsewhere)")
    if training and (args.a is None or args.b is None):
        raise NanochatError("give both --a and --b (an empty string is base_train's defaults)")
    if collecting and (args.a_runs is None or args.b_runs is None):
        raise NanochatError("give both --a-runs and --b-runs")
    if args.seeds < 1:
        raise NanochatError(f"--seeds={args.seeds} must be at least 1 (2 or more for an interval)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise NanochatError(f"--name={args.name!r} must be a plain name (letters, digits, '.', '_', '-')")
    for option in ("a", "b", "common"):
        taken = [f for f in ("--seed", "--model-tag") if re.search(rf"(^|\s){f}(=|\s|$)", getattr(args, option) or "")]
        if taken:
            raise NanochatError(f"--{option} sets {' and '.join(taken)}: the A/B tool gives every run its own "
                                "--seed and --model-tag")

# -----------------------------------------------------------------------------
# Student's t distribution, from the regularized incomplete beta function (no scipy here)

def incomplete_beta(x, a, b):
    """The regularized incomplete beta function I_x(a, b): the CDF of a Beta(a, b) variable at x. Its continued
    fraction converges fast for x below the mean (a + 1) / (a + b + 2); above it, I_x(a, b) = 1 - I_{1-x}(b, a).
    The fraction is evaluated from the front (modified Lentz), its partial numerators alternating between
    m (b - m) x / ((a + 2m - 1)(a + 2m)) and -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    tiny = 1e-300  # stands in for a zero denominator, as Lentz's method prescribes

    def nonzero(v):
        return v if abs(v) > tiny else tiny
    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / nonzero(1.0 + numerator * d)
            c = nonzero(1.0 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) * fraction / a


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's T with df (any real > 0) degrees of freedom."""
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)


def t_cdf(t, df):
    tail = t_two_sided_p(t, df) / 2
    return 1.0 - tail if t > 0 else tail


def t_quantile(q, df):
    """The t with t_cdf(t, df) = q, for q in [0.5, 1) (bisection: the CDF is monotone)."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < q else (low, mid)
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2

# -----------------------------------------------------------------------------
# Intervals and the test

def mean_and_variance(values):
    """Mean and sample variance (n - 1 denominator; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else None)


def mean_interval(values):
    """(mean, half-width of its 95% t interval), the half-width None for a single value."""
    mean, variance = mean_and_variance(values)
    if variance is None:
        return mean, None
    n = len(values)
    return mean, t_quantile(1 - ALPHA / 2, n - 1) * math.sqrt(variance / n)


def welch(a, b):
    """Welch's t-test of mean(b) - mean(a): (difference, its standard error, degrees of freedom, two-sided p). With
    no spread in either arm the difference is exact: standard error 0, p 1 if it is 0, else p 0."""
    (mean_a, var_a), (mean_b, var_b) = mean_and_variance(a), mean_and_variance(b)
    difference = mean_b - mean_a
    va, vb = var_a / len(a), var_b / len(b)  # squared standard errors of the two means
    if va + vb == 0:
        return difference, 0.0, math.inf, 1.0 if difference == 0 else 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    se = math.sqrt(va + vb)
    return difference, se, df, t_two_sided_p(difference / se, df)


def welch_interval(se, df):
    """Half-width of the 95% interval of Welch's difference: p < ALPHA exactly when it excludes 0."""
    return t_quantile(1 - ALPHA / 2, df) * se if se > 0 else 0.0

# -----------------------------------------------------------------------------
# Runs: trained here, or collected from their summary.json

SUMMARY_LINE = "Wrote run summary to "  # what base_train prints when it has written summary.json


def results_dir(name):
    # nanochat.common.get_base_dir's location, without importing that module: it imports torch, which on a GPU
    # machine would start CUDA in this process for as long as the runs take
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    return base_dir, os.path.join(base_dir, "ab_results", name)


def read_summary(path):
    """A run's summary.json (path: the file or its checkpoint dir), checked for a val bpb."""
    path = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise NanochatError(f"cannot read {path} ({e}); only a finished base_train run writes it") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("val_bpb"), (int, float)):
        raise NanochatError(f"{path} has no val_bpb (was the run's validation off, --eval-every=-1?)")
    return {**summary, "path": path}


def written_summary(log_path):
    """The summary.json a finished base_train run says it wrote (a run stopped early writes none: an older file of
    the same tag must not pass for its result)."""
    with open(log_path, errors="replace") as log:
        paths = [line.split(SUMMARY_LINE, 1)[1].strip() for line in log if SUMMARY_LINE in line]
    if not paths:
        raise NanochatError(f"the run wrote no summary.json (stopped before its end?); see {log_path}")
    return paths[-1]


def train_runs(args):
    """Train both arms, alternating A and B seed by seed; returns {arm: [summary, ...]}."""
    base_dir, out_dir = results_dir(args.name)
    os.makedirs(out_dir, exist_ok=True)
    launcher = shlex.split(args.launcher) if args.launcher.strip() else [sys.executable]
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir)  # the runs write where this process reads
    runs = {"A": [], "B": []}
    plan = [(arm, seed) for seed in range(FIRST_SEED, FIRST_SEED + args.seeds) for arm in ("A", "B")]
    for i, (arm, seed) in enumerate(plan, 1):
        tag = f"ab_{args.name}_{arm.lower()}_s{seed}"
        flags = shlex.split(args.common) + shlex.split(args.a if arm == "A" else args.b)
        command = launcher + ["-m", "scripts.base_train", *flags, f"--seed={seed}", f"--model-tag={tag}"]
        log_path = os.path.join(out_dir, f"{tag}.log")
        print(f"[{i}/{len(plan)}] {arm} seed {seed}: {shlex.join(command)}", flush=True)
        start = time.time()
        with open(log_path, "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            with open(log_path, errors="replace") as log:
                last = ([line.strip() for line in log if line.strip()] or ["(empty log)"])[-1]
            raise NanochatError(f"{arm} seed {seed} failed (exit {code}): {last} (full log: {log_path})")
        summary = read_summary(written_summary(log_path))
        runs[arm].append(summary)
        print(f"    val bpb {summary['val_bpb']:.4f} in {time.time() - start:.0f}s (log: {log_path})", flush=True)
    return runs

# -----------------------------------------------------------------------------
# Report: per-arm table, B - A with a verdict per metric, plot

def fmt(mean, half):
    return f"{mean:.4f}" + ("" if half is None else f" ± {half:.4f}")


def arm_table(runs, key):
    """One row per arm: runs, seeds, mean ± 95%, every run's value, the mean evaluation standard error."""
    rows = [["arm", "runs", "seeds", "mean ± 95%", "per run", "eval se"]]
    for arm, summaries in runs.items():
        values = [s[key] for s in summaries]
        eval_se = [s.get(f"{key}_se") for s in summaries]
        rows.append([arm, str(len(values)), ",".join(str(s.get("seed", "?")) for s in summaries),
                     fmt(*mean_interval(values)), " ".join(f"{v:.4f}" for v in values),
                     f"{sum(eval_se) / len(eval_se):.4f}" if None not in eval_se else "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def verdict(name, a, b, lower_is_better):
    """The B - A line of one metric."""
    if min(len(a), len(b)) < 2:
        few = "A" if len(a) < 2 else "B"
        return (f"{name}: B - A = {sum(b) / len(b) - sum(a) / len(a):+.4f}, no interval and no p-value: arm {few} has "
                "1 run, at least 2 per arm are needed (run more seeds)")
    difference, se, df, p = welch(a, b)
    line = f"{name}: B - A = {difference:+.4f} ± {welch_interval(se, df):.4f} (95%, Welch df {df:.1f}), p = {p:.3g}: "
    if p >= ALPHA:
        return line + f"no significant difference at p < {ALPHA}"
    better = "B" if (difference < 0) == lower_is_better else "A"
    return line + f"{better} is better ({'lower' if lower_is_better else 'higher'} {name})"


def report(runs, plot_path):
    for arm, summaries in runs.items():
        seeds = [s.get("seed") for s in summaries if s.get("seed") is not None]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
            print(f"WARNING: arm {arm} has seed {seed} {seeds.count(seed)} times: runs of one recipe and seed are "
                  "copies, not independent repeats")
    verdicts = []
    for key, name, lower_is_better in METRICS:
        have = sum(isinstance(s.get(key), (int, float)) for summaries in runs.values() for s in summaries)
        total = sum(len(summaries) for summaries in runs.values())
        if have < total:
            if have:  # CORE of only some runs: comparing those would pick runs by what they logged
                print(f"{name}: in {have} of {total} runs' summaries only, not compared")
            continue
        tokens = sorted({s.get("val_tokens") for summaries in runs.values() for s in summaries} - {None})
        tokens = ", ".join(f"{t:,}" for t in tokens)
        evaluated = f"; evaluated on {tokens} tokens" if tokens and key == "val_bpb" else ""
        print(f"\n{name} ({'lower' if lower_is_better else 'higher'} is better{evaluated}):")
        print(arm_table(runs, key))
        if all(len(s) > 1 and len({r[key] for r in s}) == 1 for s in runs.values()):
            print("WARNING: every run of each arm gave the same number: the seeds changed nothing, so chance cannot be "
                  "measured and the interval is 0")
        verdicts.append(verdict(name, [s[key] for s in runs["A"]], [s[key] for s in runs["B"]], lower_is_better))
        print(verdicts[-1])
    try:
        plot(runs, plot_path, title=verdicts[0])  # the val bpb line: every run has a val bpb
        print(f"Plot saved to: {plot_path}")
    except ImportError as e:
        print(f"Plot skipped: {e} (install matplotlib)")


def mean_curve(summaries):
    """(tokens, mean bpb, half-width or None) at the evaluations every run of an arm made."""
    curves = [{step * s.get("total_batch_size", 1): bpb for step, bpb in s.get("val_curve") or []} for s in summaries]
    shared = sorted(set.intersection(*(set(c) for c in curves)))
    points = [(x, *mean_interval([c[x] for c in curves])) for x in shared]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def plot(runs, plot_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_curve, ax_final) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    for i, (arm, summaries) in enumerate(runs.items()):
        color = f"C{i}"
        xs, means, halves = mean_curve(summaries)
        if xs:
            ax_curve.plot(xs, means, "-", color=color, label=f"{arm} (mean of {len(summaries)})")
            if None not in halves:  # (one run: no band)
                low, high = [m - h for m, h in zip(means, halves)], [m + h for m, h in zip(means, halves)]
                ax_curve.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
        values = [s["val_bpb"] for s in summaries]
        mean, half = mean_interval(values)
        ax_final.plot([i] * len(values), values, "o", color=color, alpha=0.6)
        ax_final.errorbar([i + 0.15], [mean], yerr=[[half or 0.0], [half or 0.0]], fmt="s", color=color, capsize=4)
    ax_curve.set_xlabel("training tokens")
    ax_curve.set_ylabel("val bpb")
    ax_curve.set_title("val bpb during training (band: 95% interval of the mean over seeds)")
    ax_curve.grid(True, alpha=0.3)
    ax_curve.legend()
    ax_final.set_xticks(range(len(runs)), list(runs))
    ax_final.set_xlim(-0.5, len(runs) - 0.5)
    ax_final.set_title("final val bpb (runs, mean ± 95%)")
    ax_final.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)

# -----------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.a_runs is not None:
        runs = {"A": [read_summary(p) for p in args.a_runs], "B": [read_summary(p) for p in args.b_runs]}
        print("\n".join(f"{arm}: {', '.join(s['path'] for s in summaries)}" for arm, summaries in runs.items()))
    else:
        runs = train_runs(args)
        print(f"A: {args.common} {args.a}".rstrip() + "\n" + f"B: {args.common} {args.b}".rstrip())
    report(runs, os.path.join(results_dir(args.name)[1], "ab.png"))


if __name__ == "__main__":
    run(main)
