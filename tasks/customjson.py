"""
CustomJSON: conversations from your own JSONL file, one conversation per line, each line a JSON list of messages
[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...] (an object {"messages": [...]}
is accepted too). Roles alternate user/assistant starting with the user, contents are non-empty strings.
Every line is checked when the file is loaded; the first bad one stops with its file:line (nothing is dropped).
Used for the identity conversations that teach the model who it is.
"""

import os

from nanochat.common import get_base_dir, iter_jsonl
from tasks.common import Task, TaskDataError, BUNDLED_DATA_DIR, local_path, validate_messages

IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


def identity_conversations_path():
    """(path, source) of the identity conversations to train on, first that exists:
    <NANOCHAT_LOCAL_DATA>/nanochat_identity/identity_conversations.jsonl, <base>/identity_conversations.jsonl
    (where the speedrun downloads it), then our own small bundled set data/identity_conversations.jsonl."""
    path = local_path("nanochat_identity", "identity_conversations.jsonl")
    if path is not None:
        return str(path), "NANOCHAT_LOCAL_DATA"
    path = os.path.join(get_base_dir(), "identity_conversations.jsonl")
    if os.path.exists(path):
        return path, "base dir"
    return str(BUNDLED_DATA_DIR / "identity_conversations.jsonl"), "bundled"  # ships with the repository


class CustomJSON(Task):

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        self.filepath = str(filepath)
        if not os.path.exists(self.filepath):
            raise TaskDataError(
                f"CustomJSON file {self.filepath} does not exist. For the identity conversations either download "
                f"them (curl -L -o {os.path.join(get_base_dir(), 'identity_conversations.jsonl')} {IDENTITY_URL}), "
                "or use tasks.customjson.identity_conversations_path(), which falls back to our bundled set")
        # every line is validated now: TaskDataError names the first bad one
        self.conversations = []
        for lineno, messages in iter_jsonl(self.filepath, TaskDataError):
            if isinstance(messages, dict) and "messages" in messages:
                messages = messages["messages"]
            validate_messages(messages, f"{self.filepath}:{lineno}")
            self.conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
