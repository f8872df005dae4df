"""
ARC (allenai/ai2_arc), ARC-Easy or ARC-Challenge: grade-school science multiple choice. Categorical.

Letters are whatever the row uses (usually A-D, sometimes 1-4, 3 or 5 choices).
Local copies, first that exists: <NANOCHAT_LOCAL_DATA>/arc/<subset>/<split>.jsonl in the hub's row format; for the
test split, the CORE eval bundle's converted test sets (eval_data/world_knowledge/arc_{easy,challenge}.jsonl) in
<NANOCHAT_LOCAL_DATA>/eval_bundle or in $NANOCHAT_EVAL_BUNDLE. Else the hub.
"""

import os
from pathlib import Path

from tasks.common import (MultipleChoiceTask, load_task_dataset, local_path, multiple_choice_example, read_jsonl,
                          read_local_jsonl)

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


def load_local_arc(subset, split):
    """Rows of the first local copy of ARC subset/split, or None."""
    rows = read_local_jsonl(("arc", subset, f"{split}.jsonl"), ("question", "choices", "answerKey"))
    if rows is not None or split != "test":
        return rows
    bundle_file = Path("eval_data", "world_knowledge", BUNDLE_FILES[subset])
    for bundle in (local_path("eval_bundle"), os.environ.get("NANOCHAT_EVAL_BUNDLE")):
        if bundle and Path(bundle, bundle_file).exists():
            return rows_from_eval_bundle(Path(bundle, bundle_file))
    return None


class ARC(MultipleChoiceTask):

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("ARC-Easy", "ARC-Challenge"), "ARC subset must be ARC-Easy|ARC-Challenge"
        assert split in ("train", "validation", "test"), "ARC split must be train|validation|test"
        self.ds = load_task_dataset(f"ARC {subset}/{split}", "allenai/ai2_arc", subset, split,
                                    lambda: load_local_arc(subset, split),
                                    local_hint=f"arc/{subset}/{split}.jsonl or eval_bundle/eval_data/world_knowledge/"
                                               f"{BUNDLE_FILES[subset]}")

    def get_example(self, index):
        row = self.ds[index]
        letters, answer = row["choices"]["label"], row["answerKey"]
        assert answer in letters, f"ARC answer {answer!r} is not one of the row's letters {letters}"
        return multiple_choice_example(row["question"], letters, row["choices"]["text"], answer)
