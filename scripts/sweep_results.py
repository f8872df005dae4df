"""
Results bookkeeping for the training sweeps (runs/miniseries.sh and runs/scaling_laws.sh).

One small tool shared by both sweeps, so they record, skip and display results the same way:

    python -m scripts.sweep_results done   --kind miniseries --csv F --depth 12         # exit 0 if d12 is in F
    python -m scripts.sweep_results append --kind miniseries --csv F --summary S --wall-time 812.5
    python -m scripts.sweep_results report --kind miniseries --csv F --plot P.png        # table + PNG
    (--kind scaling additionally takes --flops-budget for `done` and `append`)

Rows are read from the summary.json that scripts/base_train.py writes next to its checkpoint, never scraped from the
training log (scraped lines silently give empty columns when the wording changes).
The CSV starts with the columns the user docs list, in their order; a few extra columns (FLOPs, wall time, and the
standard errors of val bpb and CORE with the number of val tokens) follow so the plots, error bars included, need
nothing else. A CSV written before the newest extra columns existed is read as is and gains them when rewritten.

The sweeps call this tool twice per training run, so it imports no torch: bad input is a NanochatError (nanochat.errors
imports nothing), turned into the `error:` line and exit 1 by main itself rather than nanochat.cli.run, whose module
also holds the torch-based command-line helpers of the model-loading scripts.
"""

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time

from nanochat.errors import NanochatError  # imports nothing: this tool stays free of torch

# Column layouts. The first block of each list is the documented contract; the rest are extras we add at the end.
MINISERIES_COLUMNS = [
    "depth", "model_dim", "num_params", "num_scaling_params", "num_iterations", "tokens_trained",
    "param_data_ratio", "val_bpb", "core_score", "train_time_sec",
    "total_training_flops", "wall_time_sec", "val_bpb_se", "val_tokens", "core_score_se",
]
SCALING_COLUMNS = [
    "flops_budget", "depth", "model_dim", "params_wte", "params_value_embeds", "params_lm_head",
    "params_transformer", "params_scalars", "params_total", "num_iterations", "tokens_trained", "val_bpb",
    "core_score", "train_time_sec",
    "num_scaling_params", "param_data_ratio", "total_training_flops", "wall_time_sec", "val_bpb_se", "val_tokens",
    "core_score_se",
]
COLUMNS = {"miniseries": MINISERIES_COLUMNS, "scaling": SCALING_COLUMNS}
# The scaling columns of the param_counts groups in summary.json
PARAM_GROUP_COLUMNS = {"params_wte": "wte", "params_value_embeds": "value_embeds", "params_lm_head": "lm_head",
                       "params_transformer": "transformer_matrices", "params_scalars": "scalars", "params_total": "total"}
# The columns that identify a run: a row with the same key is "already done".
KEY_COLUMNS = {"miniseries": ["depth"], "scaling": ["flops_budget", "depth"]}


def log(msg):
    # Same timestamp prefix as the shell scripts' log lines, so the sweep output reads as one log.
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)



# -----------------------------------------------------------------------------
# CSV I/O


def read_rows(csv_path, kind):
    """Rows of an existing results CSV as dicts ([] if the file does not exist). Refuses a foreign header; an older
    one (the current columns but the newest extras) is read, those cells empty."""
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        if header != COLUMNS[kind][:len(header)]:
            raise NanochatError(f"{csv_path} has columns {','.join(header)} but a {kind} results file needs "
                                f"{','.join(COLUMNS[kind])}; move the old file aside (or use another series name/label) and re-run")
        return [dict(zip(header, row)) for row in reader if row]


def write_rows_atomic(csv_path, kind, rows):
    """Rewrite the whole CSV through a temp file + rename, so a crash never leaves a half-written row."""
    directory = os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".results.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS[kind], lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS[kind]} for row in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, csv_path)


def same_number(a, b):
    # flops budgets may be spelled 1e18, 1e+18 or 1000000000000000000: compare as numbers, not strings
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def find_row(rows, kind, key):
    return next((row for row in rows if all(same_number(row.get(c), key[c]) for c in KEY_COLUMNS[kind])), None)

# -----------------------------------------------------------------------------
# summary.json -> CSV row


def load_summary(summary_path, since=None):
    if not os.path.exists(summary_path):
        raise NanochatError(f"{summary_path} not found: base_train did not finish (see its log next to the results CSV)")
    if since is not None and os.path.getmtime(summary_path) < since:
        raise NanochatError(f"{summary_path} is older than this run: base_train did not write a new summary (see its log)")
    try:
        with open(summary_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise NanochatError(f"{summary_path} is not valid JSON ({e}); re-run that training run")


def fmt_float(x, digits):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{float(x):.{digits}f}"


def summary_to_row(summary, kind, wall_time=None, flops_budget=None):
    """One CSV row from the summary.json that scripts/base_train.py writes (its keys, read as they are)."""
    groups = summary["param_counts"]
    row = {
        "depth": int(summary["depth"]),
        "model_dim": int(summary["model_dim"]),
        "num_params": int(summary["num_params"]),
        "num_scaling_params": int(summary["num_scaling_params"]),
        "num_iterations": int(summary["num_iterations"]),
        "tokens_trained": int(summary["tokens_trained"]),
        "param_data_ratio": fmt_float(summary["param_data_ratio"], 2),
        "val_bpb": fmt_float(summary["val_bpb"], 6),
        # empty (not 0.0) when CORE was not computed: a zero would read as a real, terrible score
        "core_score": fmt_float(summary["core_score"], 6),
        # (empty for a summary written before base_train recorded standard errors)
        "val_bpb_se": fmt_float(summary.get("val_bpb_se"), 6),
        "val_tokens": summary.get("val_tokens") or "",
        "core_score_se": fmt_float(summary.get("core_score_se"), 6),
        "train_time_sec": fmt_float(summary["train_time_sec"], 1),
        "total_training_flops": f"{float(summary['total_training_flops']):.6e}",
        "wall_time_sec": fmt_float(wall_time, 1),
    }
    if kind == "scaling":
        row["flops_budget"] = format_budget(flops_budget)
        row.update({column: int(groups[group]) for column, group in PARAM_GROUP_COLUMNS.items()})
    return row


def format_budget(flops_budget):
    # keep the user's spelling when it is already a number (1e18 stays 1e18); normalize anything else
    text = str(flops_budget)
    try:
        float(text)
    except ValueError:
        raise NanochatError(f"--flops-budget {text!r} is not a number (e.g. 1e18)")
    return text

# -----------------------------------------------------------------------------
# Table


def format_table(rows, columns):
    """The header plus one line per row dict ("-" for an empty cell)."""
    return aligned([columns] + [[(row.get(c) or "-") for c in columns] for row in rows])


def aligned(cells):
    """A `column -t` style table of lists of strings: left-aligned, two spaces between columns."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)


def sort_rows(rows, kind):
    return sorted(rows, key=lambda row: tuple(float(row[c]) if row.get(c) not in (None, "") else 0.0
                                              for c in KEY_COLUMNS[kind]))

# -----------------------------------------------------------------------------
# Plots


def numbers(rows, column):
    return [float(row[column]) if row.get(column) not in (None, "") else float("nan") for row in rows]


def error_bars(values):
    """Standard errors as error bar lengths: none drawn (0) where a row has no standard error."""
    return [v if math.isfinite(v) else 0.0 for v in values]


def fit_optimum(log_params, bpbs):
    """Fit bpb = a*x^2 + b*x + c in x = log10(params); return (x_opt, bpb_opt, coeffs) or None if no interior minimum."""
    import numpy as np
    if len(log_params) < 3:
        return None
    a, b, c = np.polyfit(log_params, bpbs, 2)
    if a <= 0:
        return None  # no minimum (curve opens downwards): the sweep does not bracket the optimum
    x_opt = -b / (2 * a)
    return x_opt, a * x_opt ** 2 + b * x_opt + c, (a, b, c)


def plot_miniseries(rows, plot_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = [r["depth"] for r in rows]
    bpb, core = numbers(rows, "val_bpb"), numbers(rows, "core_score")
    bpb_se, core_se = error_bars(numbers(rows, "val_bpb_se")), error_bars(numbers(rows, "core_score_se"))
    flops, params = numbers(rows, "total_training_flops"), numbers(rows, "num_params")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [(axes[0, 0], flops, bpb, bpb_se, "total training FLOPs", "val bpb"),
              (axes[0, 1], flops, core, core_se, "total training FLOPs", "CORE"),
              (axes[1, 0], params, bpb, bpb_se, "parameters", "val bpb"),
              (axes[1, 1], params, core, core_se, "parameters", "CORE")]
    for ax, xs, ys, errs, xlabel, ylabel in panels:
        points = [(x, y, e, d) for x, y, e, d in zip(xs, ys, errs, depths)
                  if math.isfinite(x) and math.isfinite(y) and x > 0]
        if points:
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o-",
                        capsize=3)
            for x, y, _, d in points:
                ax.annotate(f"d{d}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, f"no {ylabel} values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.suptitle("miniseries: val bpb and CORE vs compute and size (bars: ± 1 standard error)")
    fig.tight_layout()
    save_figure(fig, plot_path)
    plt.close(fig)


def scaling_optima(rows):
    """Per budget: the fitted optimum (params, bpb) of a quadratic in log10(scaling params), plus the best run."""
    budgets = sorted({float(r["flops_budget"]) for r in rows})
    results = []
    for budget in budgets:
        group = [r for r in rows if same_number(r["flops_budget"], budget)]
        pts = sorted((float(r["num_scaling_params"] or r["params_total"]), float(r["val_bpb"]), r)
                     for r in group if r.get("val_bpb") and (r.get("num_scaling_params") or r.get("params_total")))
        if not pts:
            continue
        best = min(pts, key=lambda p: p[1])
        fit = fit_optimum([math.log10(p[0]) for p in pts], [p[1] for p in pts])
        results.append({"budget": budget, "points": pts, "best": best, "fit": fit})
    return results


def plot_scaling(rows, plot_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    optima = scaling_optima(rows)
    fig, (ax, ax_opt) = plt.subplots(1, 2, figsize=(13, 5))
    fitted = []
    for i, o in enumerate(optima):
        color = f"C{i % 10}"
        xs = [p[0] for p in o["points"]]
        errs = error_bars(numbers([p[2] for p in o["points"]], "val_bpb_se"))
        ax.errorbar(xs, [p[1] for p in o["points"]], yerr=errs, fmt="o", capsize=3, color=color,
                    label=f"{o['budget']:.3g} FLOPs")
        for x, y, r in o["points"]:
            ax.annotate(f"d{r['depth']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if o["fit"]:
            x_opt, bpb_opt, coeffs = o["fit"]
            grid = np.linspace(math.log10(min(xs)), math.log10(max(xs)), 100)
            ax.plot(10 ** grid, np.polyval(coeffs, grid), "-", color=color, alpha=0.6)
            ax.plot([10 ** x_opt], [bpb_opt], "*", color=color, markersize=14)
            fitted.append((o["budget"], 10 ** x_opt))
    ax.set_xscale("log")
    ax.set_xlabel("scaling parameters (transformer matrices + lm_head)")
    ax.set_ylabel("val bpb")
    ax.set_title("val bpb (± 1 SE) vs model size at fixed FLOPs (star = fitted optimum)")
    ax.grid(True, alpha=0.3)
    if optima:
        ax.legend(fontsize=8)
    if fitted:
        budgets, n_opt = zip(*fitted)
        ax_opt.plot(budgets, n_opt, "*-", markersize=12)
        if len(fitted) >= 2:
            slope, intercept = np.polyfit(np.log10(budgets), np.log10(n_opt), 1)
            ax_opt.set_title(f"fitted optimal size: N_opt ~ C^{slope:.3f}")
        else:
            ax_opt.set_title("fitted optimal size per budget")
        ax_opt.set_xscale("log")
        ax_opt.set_yscale("log")
    else:
        ax_opt.text(0.5, 0.5, "no budget has >= 3 depths bracketing a minimum", ha="center", va="center",
                    transform=ax_opt.transAxes)
        ax_opt.set_title("fitted optimal size per budget")
    ax_opt.set_xlabel("FLOPs budget")
    ax_opt.set_ylabel("optimal scaling parameters")
    ax_opt.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, plot_path)
    plt.close(fig)


def save_figure(fig, plot_path):
    directory = os.path.dirname(os.path.abspath(plot_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".plot.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp_path, dpi=110)
    os.replace(tmp_path, plot_path)


def print_scaling_optima(rows):
    optima = scaling_optima(rows)
    if not optima:
        return
    lines = [["flops_budget", "best_depth", "best_val_bpb", "se", "fitted_opt_params", "fitted_opt_bpb"]]
    for o in optima:
        _, best_bpb, best_row = o["best"]
        if o["fit"]:
            x_opt, bpb_opt, _ = o["fit"]
            fit_cols = [f"{10 ** x_opt:.4g}", f"{bpb_opt:.6f}"]
        else:
            fit_cols = ["n/a (<3 depths or no minimum)", "-"]
        se = best_row.get("val_bpb_se") or "-"
        lines.append([f"{o['budget']:.3g}", str(best_row["depth"]), f"{best_bpb:.6f}", se] + fit_cols)
    print("Optimum per budget (quadratic fit of val bpb in log10 scaling params):")
    print(aligned(lines))

# -----------------------------------------------------------------------------
# Commands


def cmd_done(args):
    # the flags hold the key columns (depth, flops_budget)
    return 0 if find_row(read_rows(args.csv, args.kind), args.kind, vars(args)) else 1


def cmd_append(args):
    rows = read_rows(args.csv, args.kind)
    summary = load_summary(args.summary, since=args.since)
    try:
        row = summary_to_row(summary, args.kind, wall_time=args.wall_time, flops_budget=args.flops_budget)
    except KeyError as e:
        raise NanochatError(f"{args.summary} has no {e} entry: it was not written by this version of scripts/base_train.py")
    d = row["depth"]
    if row["core_score"] == "":
        log(f"WARNING: Could not extract CORE score for d={d} (CORE was not computed in this run); column left empty")
    elif summary.get("core_partial"):
        log(f"NOTE: the CORE score for d={d} is partial (some eval-bundle tasks were missing): not comparable "
            "with published full CORE scores")
    bpb_text = f"{row['val_bpb']} ± {row['val_bpb_se'] or '?'}"
    core_text = f"{row['core_score']} ± {row['core_score_se'] or '?'}" if row["core_score"] else "n/a"
    if args.kind == "miniseries":
        log(f"Training d={d}: params={row['num_params']}, scaling params={row['num_scaling_params']}, "
            f"iters={row['num_iterations']}, ratio={row['param_data_ratio']}, val bpb={bpb_text}, "
            f"CORE={core_text}, time={row['train_time_sec']}s")
    else:
        log(f"  Params: {row['params_total']} (transformer: {row['params_transformer']}), "
            f"Iters: {row['num_iterations']}, Val BPB: {bpb_text}, CORE: {core_text}")
    existing = find_row(rows, args.kind, row)
    if existing is not None:
        rows.remove(existing)  # a deliberate re-run replaces its old row instead of duplicating it
    rows.append(row)
    write_rows_atomic(args.csv, args.kind, sort_rows(rows, args.kind))
    return 0


def cmd_report(args):
    rows = read_rows(args.csv, args.kind)
    if not rows:
        raise NanochatError(f"{args.csv} has no results yet; run the sweep first")
    rows = sort_rows(rows, args.kind)
    shown = [c for c in COLUMNS[args.kind] if c != "wall_time_sec"]
    print("Results:")
    print(format_table(rows, shown))
    if args.kind == "scaling":
        print()
        print_scaling_optima(rows)
    if args.plot:
        try:
            (plot_miniseries if args.kind == "miniseries" else plot_scaling)(rows, args.plot)
            print(f"Plot saved to: {args.plot}")
        except ImportError as e:
            print(f"Plot skipped: {e} (install matplotlib)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Record, skip and display sweep results (miniseries, scaling laws)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("done", "append", "report"):
        p = sub.add_parser(name)
        p.add_argument("--kind", choices=sorted(COLUMNS), required=True, help="which sweep's CSV layout")
        p.add_argument("--csv", required=True, help="results CSV path")
        if name == "done":
            p.add_argument("--depth", type=int, required=True, help="depth to look up")
        if name in ("done", "append"):
            p.add_argument("--flops-budget", default=None, help="FLOPs budget (scaling only), e.g. 1e18")
        if name == "append":
            p.add_argument("--summary", required=True, help="summary.json written by base_train")
            p.add_argument("--wall-time", type=float, default=None, help="wall-clock seconds of the whole launch")
            p.add_argument("--since", type=float, default=None,
                           help="unix time the run started: refuse a summary.json older than this (stale)")
        if name == "report":
            p.add_argument("--plot", default=None, help="write the PNG plot here")
    args = parser.parse_args(argv)
    try:
        if args.command != "report" and args.kind == "scaling" and args.flops_budget is None:
            raise NanochatError("--flops-budget is required with --kind scaling")
        return {"done": cmd_done, "append": cmd_append, "report": cmd_report}[args.command](args)
    except NanochatError as e:  # what nanochat.cli.run does, without importing it (it may import torch)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
