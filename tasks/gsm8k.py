"""
GSM8K (openai/gsm8k): grade-school math word problems. Generative; has a 0/1 reward for RL.

The dataset's answers carry calculator annotations like `<<48/2=24>>`. They become tool calls: a python part with
the expression and a python_output part with the result, so the model learns to call the calculator mid-answer.
Local copy: <NANOCHAT_LOCAL_DATA>/gsm8k/{train,test}.jsonl (main) or {split}_socratic.jsonl (socratic).
"""

import re

from tasks.common import Task, load_task_dataset, read_local_jsonl, single_turn

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
ANNOTATION_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text):
    """The number after '#### ', commas removed, or None."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def final_answer_matches(conversation, completion):
    """1 if the completion's '#### <number>' equals the reference's (exact string after comma removal): the
    reference is the last part of the conversation's final assistant message."""
    assert isinstance(completion, str), "completion must be a string"
    content = conversation["messages"][-1]["content"]
    reference = content[-1]["text"] if isinstance(content, list) else content
    pred = extract_answer(completion)
    return int(pred is not None and pred == extract_answer(reference))


def answer_to_parts(answer):
    """Split a GSM8K answer into text / python / python_output parts (empty text pieces are kept)."""
    parts = []
    for piece in ANNOTATION_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expression, equals, result = piece[2:-2].rpartition("=")
            if not equals:  # no '=': the whole annotation is the expression
                expression, result = result, ""
            parts.append({"type": "python", "text": expression})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(Task):

    eval_type = "generative"

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic"), "GSM8K subset must be main|socratic"
        assert split in ("train", "test"), "GSM8K split must be train|test"
        filename = f"{split}.jsonl" if subset == "main" else f"{split}_socratic.jsonl"
        self.ds = load_task_dataset(f"GSM8K {subset}/{split}", "openai/gsm8k", subset, split,
                                    lambda: read_local_jsonl(("gsm8k", filename), ("question", "answer")),
                                    local_hint=f"gsm8k/{filename}")

    def get_example(self, index):
        row = self.ds[index]
        return single_turn(row["question"], answer_to_parts(row["answer"]))

    def evaluate(self, conversation, completion):
        return final_answer_matches(conversation, completion)
