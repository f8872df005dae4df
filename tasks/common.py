"""
The task machinery shared by every dataset in tasks/:
- Task: a lightweight sliced view (start/stop/step) over a dataset of conversations, plus how to grade answers;
- TaskMixture: a deterministic seeded shuffle of several tasks (seed 42 unless told);
- single_turn: the example of a one-question task (user asks, assistant answers);
- MultipleChoiceTask, multiple_choice_example, render_mc: the exact multiple-choice prompt and its grading;
- where data comes from: a local copy (env NANOCHAT_LOCAL_DATA), else the Hugging Face hub (nanochat/hub.py);
- validate_messages: the one place that checks a conversation's shape, so a bad row is named, not dropped.

Local data (NANOCHAT_LOCAL_DATA=<dir>) is laid out as:
  gsm8k/{train,test}.jsonl (and *_socratic.jsonl), mmlu/{dev,test,val,auxiliary_train}/*.csv,
  humaneval/HumanEval.jsonl.gz, nanochat_identity/identity_conversations.jsonl, english_words/words_alpha.txt,
  eval_bundle/eval_data/world_knowledge/arc_{easy,challenge}.jsonl (ARC test only), smoltalk/{train,test}.jsonl.
A task's data is its local copy if present, else the hub's (downloaded once into a cache), so a run with local data
does not depend on whether the network happens to be up.
"""

import os
import random
from pathlib import Path

from nanochat.common import DownloadError, iter_jsonl
from nanochat.errors import NanochatError
from nanochat.hub import HubDataset, load_hub_dataset, hub_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA_DIR = REPO_ROOT / "data"  # our own small offline data (identity conversations)


class TaskDataError(NanochatError, RuntimeError):
    """A task's data is unavailable or malformed. The message says which file/row and what to do. (Also a
    RuntimeError: the training scripts catch a data source that cannot be had as one.)"""


# -----------------------------------------------------------------------------
# Tasks

class Task:
    """A view over a dataset: task[i] is example start + i*step of the underlying data."""

    eval_type = None  # 'generative' or 'categorical'

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0, f"start must be >= 0, got {start}"
        assert stop is None or stop >= start, f"stop must be None or >= start, got start={start} stop={stop}"
        assert step >= 1, f"step must be >= 1, got {step}"
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        return len(self.ds)  # most tasks are a view of one loaded dataset, self.ds

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        raise NotImplementedError

    def reward(self, conversation, completion):
        """The RL reward of a completion: 1.0 when evaluate() passes it, else 0.0."""
        return float(self.evaluate(conversation, completion))

    def __len__(self):
        # stop is clamped to the data size: asking for stop=5200 of a smaller local copy gives what exists
        # instead of a view whose tail crashes when indexed
        n = self.num_examples()
        return len(range(self.start, n if self.stop is None else min(self.stop, n), self.step))

    def __getitem__(self, index):
        assert isinstance(index, int), f"task index must be an int, got {type(index).__name__}"
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture(Task):
    """Several tasks shuffled together with a fixed seed: same tasks, lengths and seed -> same order, every run.
    Pass a task twice to oversample it."""

    def __init__(self, tasks, seed=42, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.tasks = tasks
        self.index_map = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)  # interleave the tasks through the whole mixture

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        assert 0 <= index < len(self.index_map), f"index {index} out of range for mixture of {len(self.index_map)}"
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]


class MultipleChoiceTask(Task):
    """A categorical task whose examples come from multiple_choice_example: the model answers with one letter."""

    eval_type = "categorical"

    def evaluate(self, conversation, completion):
        letters = conversation["letters"]
        assert completion in letters, f"{type(self).__name__} answer must be one of {letters}, got {completion!r}"
        return completion == conversation["messages"][-1]["content"]


def single_turn(user, assistant, **fields):
    """The example of a one-question task: {"messages": [the user's turn, the assistant's], **fields}."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **fields}


def multiple_choice_example(question, letters, choices, answer):
    return single_turn(render_mc(question, letters, choices), answer, letters=letters)


def render_mc(question, letters, choices):
    """The multiple-choice user message. The letter comes after its choice and with no space after '=', so the
    prompt contains the very token ('A', not ' A') the assistant answers with."""
    choice_lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{choice_lines}\nRespond only with the letter of the correct answer."


# -----------------------------------------------------------------------------
# Conversation validation

def validate_messages(messages, where, allow_system=False, require_nonempty=True):
    """Raise TaskDataError naming `where` (e.g. 'file.jsonl:12') unless messages is a well-formed conversation:
    optional leading system message (if allowed), then >= 2 messages alternating user/assistant from the user,
    every content a string (non-empty for user/assistant when require_nonempty)."""
    if not isinstance(messages, list):
        raise TaskDataError(f"{where}: a conversation must be a JSON list of messages, got {type(messages).__name__}")
    has_system = allow_system and messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    offset = 1 if has_system else 0
    if len(messages) - offset < 2:
        raise TaskDataError(f"{where}: a conversation needs at least a user and an assistant message, "
                            f"got {len(messages) - offset}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TaskDataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        content = message["content"]
        if not isinstance(content, str):
            raise TaskDataError(f"{where}: message {i} ({message['role']}) content must be a string")
        if require_nonempty and message["role"] != "system" and not content.strip():
            raise TaskDataError(f"{where}: message {i} ({message['role']}) has empty content")
        expected = "system" if i < offset else ("user", "assistant")[(i - offset) % 2]
        if message["role"] != expected:
            raise TaskDataError(f"{where}: message {i} has role {message['role']!r}, expected {expected!r} "
                                "(roles must alternate user/assistant, starting with user)")


# -----------------------------------------------------------------------------
# Where data comes from

def read_jsonl(path, required_keys=None):
    """Rows of a JSONL file; an object missing one of required_keys raises TaskDataError naming file:line."""
    rows = []
    for lineno, row in iter_jsonl(path, TaskDataError):
        if required_keys is not None and (not isinstance(row, dict) or any(k not in row for k in required_keys)):
            raise TaskDataError(f"{path}:{lineno}: expected a JSON object with keys {list(required_keys)}")
        rows.append(row)
    return rows


def local_path(*parts):
    """<NANOCHAT_LOCAL_DATA>/<parts...> if the env var is set and that file or folder exists, else None."""
    value = os.environ.get("NANOCHAT_LOCAL_DATA", "").strip()
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        raise TaskDataError(f"NANOCHAT_LOCAL_DATA={value} is not a directory; point it at a folder with the local "
                            "task data (gsm8k/, mmlu/, humaneval/, nanochat_identity/, english_words/) or unset it")
    path = root.joinpath(*parts)
    return path if path.exists() else None


def read_local_jsonl(parts, required_keys):
    """The rows of the local JSONL file <NANOCHAT_LOCAL_DATA>/<parts...>, or None when there is none."""
    path = local_path(*parts)
    return read_jsonl(path, required_keys) if path is not None else None


def load_task_dataset(what, repo_id, subset, split, load_local, local_hint):
    """The rows of one dataset split, shuffled with seed 42 (so index i is the same row whichever source).
    load_local() returns the rows of a local copy (a list of dicts), or None when there is none; else the hub's rows.
    `what` names the task in messages, `local_hint` says which local file would serve it."""
    rows = load_local()
    if rows is not None:
        if not rows:
            raise TaskDataError(f"{what}: the local copy is empty ({local_hint})")
        return HubDataset.from_rows(rows).shuffle(seed=42)
    try:
        return load_hub_dataset(repo_id, subset, split).shuffle(seed=42)
    except DownloadError as e:
        raise TaskDataError(
            f"{what} is unavailable: {e}. To use a local copy, set NANOCHAT_LOCAL_DATA to a folder holding "
            f"{local_hint}; or put the hub's parquet shards in {hub_cache_dir(repo_id, subset, split)} with a "
            "shard_urls.json listing them."
        ) from e
