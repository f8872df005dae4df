"""The --from-dir shard builder now lives in nanochat/dataset.py; this name stays until tests/test_core_eval.py
imports build_from_dir from there."""

from nanochat.dataset import build_from_dir, write_shards  # noqa: F401
