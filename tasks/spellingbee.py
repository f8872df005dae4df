"""
Spelling and letter counting, generated on the fly from a word list (small models are bad at both because they see
tokens, not letters).
- SpellingBee: "how many <letter> are in <word>?" answered by spelling the word out, counting by hand, then checking
  with a python tool call. Generative, graded like GSM8K ('#### <n>'), has a 0/1 reward.
- SimpleSpelling: "Spell the word: <word>" -> "<word>:<w,o,r,d>". Generative, for training only.
Example i is drawn from random.Random(i) (train) or Random(10_000_000 + i) (test), so train and test never share a
seed and `size` is just how many examples you want.

Word list, first that exists: <NANOCHAT_LOCAL_DATA>/english_words/words_alpha.txt; <base>/words_alpha.txt; a download
of dwyl/english-words (skipped in offline mode); else the words of our bundled identity conversations (always there,
so spelling tasks work with no network; a warning says so).
"""

import os
import re
import random
import functools

from nanochat.common import DownloadError, download_file_with_lock, get_base_dir, is_offline
from tasks.common import Task, TaskDataError, BUNDLED_DATA_DIR, local_path, single_turn
from tasks.gsm8k import final_answer_matches

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_RANDOM_SEED_OFFSET = 10_000_000
QUOTES = ["", "'", '"']

# Our own question templates: mostly English, the rest in other languages, so the model meets the task in many
# phrasings. Each has {letter} and {word}.
USER_MSG_TEMPLATES = [
    "How many times does the letter {letter} appear in {word}", "Count the {letter}s in {word}",
    "In the word {word}, how many {letter} are there", "What is the number of {letter} in {word}",
    "How often does {letter} show up in the word {word}", "Tell me how many {letter}'s the word {word} has",
    "Can you count how many times {letter} occurs in {word}", "I need the count of letter {letter} in {word}",
    "Number of occurrences of {letter} in {word}", "Please count every {letter} in the word {word}",
    "If you spell out {word}, how many {letter} do you write", "Quick question: how many {letter} are in {word}",
    "Does {word} contain the letter {letter}, and how many times", "Letter count: {letter} in {word}",
    "How many {letter} can you find in {word}", "Spell {word} and tell me how many {letter} it has",
    "Count how many times the character {letter} is used in {word}", "What's the {letter} count for the word {word}",
    "In {word}, count the letter {letter}", "Exactly how many {letter} letters does {word} have",
    "Help me with spelling: how many {letter} in {word}",
    "My friend says {word} has a lot of {letter}. How many exactly",
    "Find the number of times {letter} appears in {word}", "How many instances of {letter} are in the word {word}",
    "Give me the number of {letter} characters in {word}", "Looking at the word {word}, how many {letter} do you see",
    "Tally the letter {letter} in {word}", "Is there any {letter} in {word}? How many",
    "How many {letter} does the word {word} contain", "Count the occurrences of {letter} within {word}",
    "¿Cuántas veces aparece la letra {letter} en la palabra {word}", "¿Cuántas {letter} tiene {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}", "Combien de {letter} y a-t-il dans le mot {word}",
    "Wie oft kommt der Buchstabe {letter} im Wort {word} vor", "Wie viele {letter} hat das Wort {word}",
    "Quante volte compare la lettera {letter} nella parola {word}",
    "Quantas vezes a letra {letter} aparece em {word}", "Hoe vaak komt de letter {letter} voor in {word}",
    "Ile razy litera {letter} występuje w słowie {word}", "Hur många {letter} finns det i ordet {word}",
    "Kuinka monta {letter}-kirjainta sanassa {word} on", "Сколько раз буква {letter} встречается в слове {word}",
    "Скільки літер {letter} у слові {word}", "{word} kelimesinde kaç tane {letter} harfi var",
    "単語 {word} に文字 {letter} はいくつありますか", "{word} 这个单词里有几个字母 {letter}", "단어 {word}에 {letter} 글자가 몇 개 있나요",
    "Berapa kali huruf {letter} muncul dalam kata {word}", "Có bao nhiêu chữ {letter} trong từ {word}",
    "कितनी बार अक्षर {letter} शब्द {word} में आता है",
]


@functools.lru_cache(maxsize=4)
def _read_word_file(path):
    with open(path, encoding="utf-8") as f:
        words = tuple(w for w in (line.strip() for line in f) if w)  # the upstream file has CRLF endings
    if not words:
        raise TaskDataError(f"{path}: the word list is empty")
    return words


@functools.lru_cache(maxsize=1)
def _bundled_words():
    """Every distinct lowercase a-z word (2+ letters) of our bundled identity conversations, sorted (warns once).
    That file ships with the repository, so spelling tasks always have words."""
    text = (BUNDLED_DATA_DIR / "identity_conversations.jsonl").read_text(encoding="utf-8").lower()
    words = tuple(sorted(set(re.findall(r"\b[a-z]{2,}\b", text))))
    print(f"WARNING: using the small bundled word list ({len(words)} words from data/identity_conversations.jsonl) "
          "for spelling tasks; set NANOCHAT_LOCAL_DATA to a folder with english_words/words_alpha.txt for the full one")
    return words


def load_words():
    """(words, description of where they came from)."""
    path = local_path("english_words", "words_alpha.txt")
    if path is not None:
        return _read_word_file(str(path)), str(path)
    path = os.path.join(get_base_dir(), "words_alpha.txt")
    if not os.path.exists(path) and not is_offline():
        try:
            download_file_with_lock(WORD_LIST_URL, "words_alpha.txt")
        except DownloadError as e:
            print(f"WARNING: could not download the SpellingBee word list ({e})")
    if os.path.exists(path):
        return _read_word_file(path), path
    words = _bundled_words()
    return words, f"bundled ({len(words)} words)"


def spelled_out(word):
    return f"{word}:{','.join(word)}"


class WordTask(Task):
    """`size` generated examples over the word list; example i of a split comes from its own seeded rng."""

    eval_type = "generative"

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"{type(self).__name__} split must be train|test"
        self.size, self.split = size, split
        self.words, self.word_source = load_words()

    def num_examples(self):
        return self.size

    def example_rng(self, index):
        return random.Random(index if self.split == "train" else TEST_RANDOM_SEED_OFFSET + index)


class SpellingBee(WordTask):

    def get_example(self, index):
        rng = self.example_rng(index)
        # the order of the rng calls below defines the examples; do not reorder
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        user_msg = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < 0.5:
            user_msg += "?"

        # the manual count: spell, then walk the letters keeping a running count
        # ('3:a' with no space keeps the letter's token the same as in the spelled-out word)
        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\n"
                  f"First spell the word out:\n{spelled_out(word)}\n\nThen count the occurrences of '{letter}':\n")
        for i, char in enumerate(word, 1):
            manual += f"{i}:{char} hit! count={word[:i].count(letter)}\n" if char == letter else f"{i}:{char}\n"
        manual += f"\nThis gives us {count}."
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return single_turn(user_msg, parts)

    def evaluate(self, conversation, completion):
        return final_answer_matches(conversation, completion)


class SimpleSpelling(WordTask):

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)  # a different word order from SpellingBee

    def get_example(self, index):
        rng = self.example_rng(index)
        word = rng.choice(self.words)
        return single_turn(f"Spell the word: {word}", spelled_out(word))
