"""
Whole-process wall time of one command in two checkouts, as a ratio: the runs alternate (before, after, before, ...)
so a noisy shared machine hurts both alike, and the medians are compared. Each run gets a fresh copy of --base-dir
(NANOCHAT_BASE_DIR: tokenizer and data), so checkpoints of one run never leak into the next.

    python -m dev.bench_process --before-dir=/tmp/before --base-dir=$NANOCHAT_BASE_DIR --runs=5 -- \\
        python -m scripts.base_train --depth=4 --max-seq-len=512 --device-batch-size=1 --eval-tokens=512 \\
        --core-metric-every=-1 --total-batch-size=512 --num-iterations=20
"""

import os
import sys
import time
import shutil
import argparse
import tempfile
import statistics
import subprocess

THIS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description="Alternating before/after wall time of one command")
    parser.add_argument("--before-dir", required=True, help="checkout to compare against (e.g. a git worktree)")
    parser.add_argument("--after-dir", default=THIS_DIR, help="checkout under test (default: this one)")
    parser.add_argument("--base-dir", required=True, help="NANOCHAT_BASE_DIR to copy for every run")
    parser.add_argument("--runs", type=int, default=3, help="runs per checkout")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to time")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.runs < 1:
        raise SystemExit("error: give --runs >= 1 and a command after --")
    times = {"before": [], "after": []}
    for run in range(args.runs):
        for name, root in (("before", args.before_dir), ("after", args.after_dir)):
            with tempfile.TemporaryDirectory() as tmp:
                base = shutil.copytree(args.base_dir, os.path.join(tmp, "base"))
                env = dict(os.environ, PYTHONPATH=os.path.abspath(root), NANOCHAT_BASE_DIR=base)
                t0 = time.time()
                out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
                elapsed = time.time() - t0
            if out.returncode != 0:
                raise SystemExit(f"error: {name} run failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            times[name].append(elapsed)
            print(f"run {run} {name}: {elapsed:.1f} s", flush=True)
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"median of {args.runs}: before {before:.1f} s | after {after:.1f} s | after/before {after / before:.2f}x")


if __name__ == "__main__":
    main()
