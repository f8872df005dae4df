"""
The SFT mixture that can be built with no network, so runs/runcpu.sh works end to end on an offline machine.

offline_sft_tasks() looks only at what is on disk (NANOCHAT_LOCAL_DATA, the hub cache under the base dir, our bundled
data/), never at the network, and returns the train and validation tasks plus a plain account of which parts of the
usual mixture are there and which are not, for the log:
- identity conversations (CustomJSON; the user's file, else our bundled set: always available in a checkout),
- SimpleSpelling and SpellingBee (full word list when present locally, else the bundled small list),
- GSM8K, MMLU auxiliary_train and SmolTalk when a local copy or a complete hub cache exists.
"""

from dataclasses import dataclass, field

from tasks.common import local_path, TaskDataError
from nanochat.hub import is_hub_cached


@dataclass
class OfflineMixture:
    train_tasks: list = field(default_factory=list)
    val_tasks: list = field(default_factory=list)
    available: list = field(default_factory=list)    # one line per part used
    unavailable: list = field(default_factory=list)  # one line per usual part that is missing, with why

    def describe(self):
        lines = ["Offline SFT mixture:"]
        lines += [f"  + {line}" for line in self.available]
        lines += [f"  - UNAVAILABLE: {line}" for line in self.unavailable]
        return "\n".join(lines)


def _have(repo_id, subset, split, *local_parts):
    """A local copy (a file, or a folder with files in it) or a complete hub cache exists."""
    path = local_path(*local_parts)
    if path is not None and (path.is_file() or any(p.is_file() for p in path.iterdir())):
        return True
    return is_hub_cached(repo_id, subset, split)


def offline_sft_tasks(simple_spelling_size=200_000, spelling_bee_size=80_000, identity_epochs=2, gsm8k_epochs=2,
                      mmlu_epochs=1, val_spelling_size=256):
    """Build every SFT task available offline. Sizes/epochs default to the reference mixture's."""
    # imported here so that importing this module stays cheap and free of cycles
    from tasks.customjson import CustomJSON, identity_conversations_path
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    from tasks.smoltalk import SmolTalk

    mix = OfflineMixture()

    # general chat
    if _have("HuggingFaceTB/smol-smoltalk", "default", "train", "smoltalk", "train.jsonl"):
        task = SmolTalk("train")
        mix.train_tasks.append(task)
        mix.available.append(f"SmolTalk train: {len(task)} rows")
        if _have("HuggingFaceTB/smol-smoltalk", "default", "test", "smoltalk", "test.jsonl"):
            mix.val_tasks.append(SmolTalk("test"))
    else:
        mix.unavailable.append("SmolTalk (general chat): not cached and no smoltalk/train.jsonl under NANOCHAT_LOCAL_DATA")

    # multiple choice
    if _have("cais/mmlu", "all", "auxiliary_train", "mmlu", "auxiliary_train"):
        task = MMLU("all", "auxiliary_train")
        mix.train_tasks += [task] * mmlu_epochs
        mix.available.append(f"MMLU auxiliary_train: {len(task)} rows x{mmlu_epochs}")
    else:
        mix.unavailable.append("MMLU auxiliary_train: not cached and no mmlu/auxiliary_train/ under NANOCHAT_LOCAL_DATA")
    if _have("cais/mmlu", "all", "test", "mmlu", "test"):
        mix.val_tasks.append(MMLU("all", "test", stop=5200))

    # math with the calculator tool
    if _have("openai/gsm8k", "main", "train", "gsm8k", "train.jsonl"):
        task = GSM8K("main", "train")
        mix.train_tasks += [task] * gsm8k_epochs
        mix.available.append(f"GSM8K main/train: {len(task)} rows x{gsm8k_epochs}")
    else:
        mix.unavailable.append("GSM8K: not cached and no gsm8k/train.jsonl under NANOCHAT_LOCAL_DATA")
    if _have("openai/gsm8k", "main", "test", "gsm8k", "test.jsonl"):
        mix.val_tasks.append(GSM8K("main", "test", stop=420))

    # who am I
    path, source = identity_conversations_path()
    if path is not None:
        task = CustomJSON(path)
        mix.train_tasks += [task] * identity_epochs
        mix.available.append(f"identity conversations ({source}, {path}): {len(task)} rows x{identity_epochs}")
    else:
        mix.unavailable.append("identity conversations: no file found (NANOCHAT_LOCAL_DATA, base dir or data/)")

    # spelling and counting (always possible: the bundled word list is the last resort)
    try:
        simple = SimpleSpelling(size=simple_spelling_size, split="train")
        bee = SpellingBee(size=spelling_bee_size, split="train")
        mix.train_tasks += [simple, bee]
        mix.val_tasks.append(SpellingBee(size=val_spelling_size, split="test"))
        mix.available.append(f"SimpleSpelling {simple_spelling_size} + SpellingBee {spelling_bee_size} "
                             f"(word list: {bee.word_source}, {len(bee.words)} words)")
    except TaskDataError as e:
        mix.unavailable.append(f"SimpleSpelling/SpellingBee: {e}")

    return mix
