"""
SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for SFT (~460K train, ~24K test).
No grading. Rows are used as they are (a leading system message is merged into the first user turn by the
tokenizer's renderer); each row's shape is checked when it is read.
Local copy: <NANOCHAT_LOCAL_DATA>/smoltalk/{train,test}.jsonl, rows {"messages": [...]}.
"""

from tasks.common import Task, load_task_dataset, read_local_jsonl, validate_messages


class SmolTalk(Task):

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), "SmolTalk split must be train|test"
        self.split = split
        self.ds = load_task_dataset(f"SmolTalk {split}", "HuggingFaceTB/smol-smoltalk", "default", split,
                                    lambda: read_local_jsonl(("smoltalk", f"{split}.jsonl"), ("messages",)),
                                    local_hint=f"smoltalk/{split}.jsonl")

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        validate_messages(messages, f"SmolTalk {self.split} row {index}", allow_system=True, require_nonempty=False)
        return {"messages": messages}
