"""
MMLU (cais/mmlu): 4-way multiple choice over 57 subjects. Categorical.

Hub layout (followed here): subset "all", splits auxiliary_train | validation | dev | test.
Local copy: <NANOCHAT_LOCAL_DATA>/mmlu/<dir>/*.csv with dir = dev | test | val | auxiliary_train, one CSV per
subject named <subject>_<split>.csv, either with a header `question,choice0,choice1,choice2,choice3,answer`
(answer = index 0-3) or in the original headerless layout (question, 4 choices, answer letter A-D).
"""

import csv

from tasks.common import MultipleChoiceTask, TaskDataError, load_task_dataset, local_path, multiple_choice_example

LOCAL_DIRS = {"dev": ("dev",), "test": ("test",), "validation": ("val", "validation"),
              "auxiliary_train": ("auxiliary_train",)}
ANSWER_INDEX = {"A": 0, "B": 1, "C": 2, "D": 3, "0": 0, "1": 1, "2": 2, "3": 3}  # both CSV layouts' answer column


def read_mmlu_csv(path, subject):
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, record in enumerate(csv.reader(f), 1):
            if lineno == 1 and record and record[0].strip().lower() == "question":
                continue  # header
            if len(record) != 6:
                raise TaskDataError(f"{path}:{lineno}: expected 6 columns (question, 4 choices, answer), got {len(record)}")
            question, *choices, answer = record
            if answer.strip() not in ANSWER_INDEX:
                raise TaskDataError(f"{path}:{lineno}: answer must be 0-3 or A-D, got {answer.strip()!r}")
            rows.append({"question": question, "subject": subject, "choices": choices,
                         "answer": ANSWER_INDEX[answer.strip()]})
    return rows


def load_local_mmlu(split):
    """All subjects of a split from the local CSVs, in subject order (as the hub's 'all' config), or None."""
    for dirname in LOCAL_DIRS[split]:
        folder = local_path("mmlu", dirname)
        files = sorted(folder.glob("*.csv")) if folder is not None else []
        if not files:
            continue
        rows = []
        for path in files:
            subject = path.stem
            for suffix in ("_" + dirname, "_" + split):
                subject = subject.removesuffix(suffix)
            rows.extend(read_mmlu_csv(path, subject))
        return rows
    return None


class MMLU(MultipleChoiceTask):

    letters = ("A", "B", "C", "D")

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        assert subset == "all", "MMLU subset must be 'all'"
        assert split in LOCAL_DIRS, f"MMLU split must be one of {list(LOCAL_DIRS)}"
        self.ds = load_task_dataset(f"MMLU {split}", "cais/mmlu", subset, split, lambda: load_local_mmlu(split),
                                    local_hint=f"mmlu/{LOCAL_DIRS[split][0]}/*.csv")

    def get_example(self, index):
        row = self.ds[index]
        assert len(row["choices"]) == 4, f"MMLU row {index} has {len(row['choices'])} choices, expected 4"
        example = multiple_choice_example(row["question"], self.letters, row["choices"], self.letters[row["answer"]])
        return {**example, "subject": row.get("subject", "")}
