"""
ARC (allenai/ai2_arc), ARC-Easy or ARC-Challenge: grade-school science multiple choice. Categorical.

Letters are whatever the row uses (usually A-D, sometimes 1-4, 3 or 5 choices).
Local copies, in order: <NANOCHAT_LOCAL_DATA>/arc/<subset>/<split>.jsonl in the hub's row format; the CORE eval
bundle's converted test sets (eval_bundle/eval_data/world_knowledge/arc_{easy,challenge}.jsonl) under
NANOCHAT_LOCAL_DATA; and, only if the hub cannot be reached, the same files in $NANOCHAT_EVAL_BUNDLE or
<base>/eval_bundle (where base_eval puts the CORE bundle).
"""

import os

from nanochat.common import get_base_dir
from tasks.common import Task, load_task_dataset, local_path, read_jsonl, render_mc

BUNDLE_FILES = {"ARC-Easy": "arc_easy.jsonl", "ARC-Challenge": "arc_challenge.jsonl"}


def rows_from_eval_bundle(path):
    """The eval bundle stores {query: 'Question: ...', choices: [...], gold: index}; convert to the hub's fields."""
    rows = []
    for i, item in enumerate(read_jsonl(path, ("query", "choices", "gold"))):
        labels = [chr(ord("A") + j) for j in range(len(item["choices"]))]
        question = item["query"].removeprefix("Question: ").strip()
        rows.append({"id": f"bundle-{i}", "question": question,
                     "choices": {"text": item["choices"], "label": labels}, "answerKey": labels[item["gold"]]})
    return rows


class ARC(Task):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), "ARC subset must be ARC-Easy|ARC-Challenge"
        assert split in ("train", "validation", "test"), "ARC split must be train|validation|test"
        bundle_rel = ("eval_bundle", "eval_data", "world_knowledge", BUNDLE_FILES[subset])

        def load_local():
            path = local_path("arc", subset, f"{split}.jsonl")
            if path is not None:
                return read_jsonl(path, ("question", "choices", "answerKey"))
            path = local_path(*bundle_rel) if split == "test" else None
            return rows_from_eval_bundle(path) if path is not None else None

        def load_fallback():
            bundles = [os.environ.get("NANOCHAT_EVAL_BUNDLE", ""), os.path.join(get_base_dir(), "eval_bundle")]
            for bundle in bundles:
                path = os.path.join(bundle, *bundle_rel[1:]) if bundle else ""
                if split == "test" and path and os.path.exists(path):
                    return rows_from_eval_bundle(path)
            return None

        self.ds = load_task_dataset(f"ARC {subset}/{split}", "allenai/ai2_arc", subset, split, load_local,
                                    local_hint=f"arc/{subset}/{split}.jsonl or {'/'.join(bundle_rel)}",
                                    load_fallback=load_fallback)

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        question, choices = row["question"], row["choices"]["text"]
        letters, answer = row["choices"]["label"], row["answerKey"]
        assert answer in letters, f"ARC answer {answer!r} is not one of the row's letters {letters}"
        messages = [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, completion):
        assert completion in conversation["letters"], \
            f"ARC answer must be one of {conversation['letters']}, got {completion!r}"
        return completion == conversation["messages"][-1]["content"]
