"""
The BPE tokenizer: trained with rustbpe (fast, Rust), run with tiktoken (fast, battle-tested).

Layout of the vocabulary: ids 0..255 are the raw bytes, then one id per learned merge, then the
special tokens below in this exact order (so with vocab_size=32768 <|bos|> is 32759).
Also here: rendering chat conversations into token ids plus a training mask.
"""

import os
import pickle

import torch
import rustbpe
import tiktoken

from nanochat.common import get_base_dir, atomic_write
from nanochat.errors import NanochatError

SPECIAL_TOKENS = [
    "<|bos|>",              # delimits documents: every document / conversation starts with it
    "<|user_start|>",       # user turns
    "<|user_end|>",
    "<|assistant_start|>",  # assistant turns
    "<|assistant_end|>",
    "<|python_start|>",     # the assistant calls the python tool (calculator)
    "<|python_end|>",
    "<|output_start|>",     # the tool's output, injected back into the stream
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers are split in groups of at most 2 digits (not 3):
# measured slightly better bpb for small vocabularies.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

# assistant content part type -> (mask, start token, end token): the model learns to emit its text and tool calls,
# but never the tool's output, which the tool produces at inference
ASSISTANT_PARTS = {"text": (1, None, None), "python": (1, "<|python_start|>", "<|python_end|>"),
                   "python_output": (0, "<|output_start|>", "<|output_end|>")}

TOKENIZER_FILENAME = "tokenizer.pkl"
TOKEN_BYTES_FILENAME = "token_bytes.pt"


class RustBPETokenizer:
    """Thin wrapper around a tiktoken Encoding, with the chat-rendering logic nanochat needs."""

    def __init__(self, enc, bos_token):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        # at least 256 (the bytes) + len(SPECIAL_TOKENS): scripts/tok_train.py checks the user's --vocab-size
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        # a small corpus can run out of pairs to merge: specials then follow the last real rank
        special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=trainer.get_pattern(),
                                mergeable_ranks=mergeable_ranks, special_tokens=special_tokens)
        return cls(enc, "<|bos|>")

    @classmethod
    def from_pretrained(cls, tiktoken_name):
        """A pretrained tiktoken encoding (e.g. gpt2, cl100k_base); <|endoftext|> plays the role of BOS."""
        return cls(tiktoken.get_encoding(tiktoken_name), "<|endoftext|>")

    def save(self, tokenizer_dir):
        """Write the encoding and token_bytes.pt (bytes per token id, for vocab-independent bits per byte) to
        tokenizer_dir, so a saved tokenizer is always complete. Returns the token bytes."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        path = os.path.join(tokenizer_dir, TOKENIZER_FILENAME)
        atomic_write(path, lambda f: pickle.dump(self.enc, f))
        print(f"Saved tokenizer encoding to {path}")
        token_bytes = compute_token_bytes(self)
        token_bytes_path = os.path.join(tokenizer_dir, TOKEN_BYTES_FILENAME)
        atomic_write(token_bytes_path, lambda f: torch.save(token_bytes, f))
        print(f"Saved token_bytes to {token_bytes_path}")
        return token_bytes

    # -------------------------------------------------------------------------
    # vocabulary

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        return self.enc.special_tokens_set

    def encode_special(self, text):
        return self.enc.encode_single_token(text)

    def get_bos_token_id(self):
        return self.bos_token_id

    # -------------------------------------------------------------------------
    # encode / decode

    def _as_id(self, token):
        return token if isinstance(token, int) else self.encode_special(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list[int]; list[str] -> list[list[int]] (encoded in parallel). Special-token text is NOT parsed."""
        prefix = [] if prepend is None else [self._as_id(prepend)]
        suffix = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            return [prefix + ids + suffix for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise ValueError(f"encode expects a str or a list of str, got {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(ids)

    # -------------------------------------------------------------------------
    # chat rendering

    def render_conversation(self, conversation, max_tokens=2048):
        """
        Tokenize one chat conversation {"messages": [{"role", "content"}, ...]}.
        Returns (ids, mask): mask[i] = 1 where the token is one the assistant must learn to produce.
        """
        messages = fold_system_message(conversation["messages"])
        assert len(messages) >= 1, f"conversation has no messages: {conversation}"

        ids, mask = [self.get_bos_token_id()], [0]
        def add(text, mask_value, start=None, end=None):
            """Append the tokens of text, between the special tokens start and end when given."""
            token_ids = self.encode(text, prepend=start, append=end)
            ids.extend(token_ids)
            mask.extend([mask_value] * len(token_ids))

        for i, message in enumerate(messages):
            expected_role = "user" if i % 2 == 0 else "assistant"
            assert message["role"] == expected_role, \
                f"message {i} has role {message['role']!r} but roles must alternate user/assistant starting with user"
            content = message["content"]
            if message["role"] == "user":
                assert isinstance(content, str), f"user message {i} content must be a string"
                add(content, 0, "<|user_start|>", "<|user_end|>")
                continue
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            elif not isinstance(content, list):
                raise ValueError(f"assistant message {i} content must be a str or a list of parts, got {type(content).__name__}")
            add("", 0, "<|assistant_start|>")
            for part in content:
                if part["type"] not in ASSISTANT_PARTS:
                    raise ValueError(f"unknown assistant content part type {part['type']!r} in message {i}")
                add(part["text"], *ASSISTANT_PARTS[part["type"]])
            add("", 1, end="<|assistant_end|>")

        return ids[:max_tokens], mask[:max_tokens]

    def visualize_tokenization(self, ids, mask):
        """Debug view: supervised tokens green, the rest red, separated by |."""
        red, green, reset = "\033[91m", "\033[92m", "\033[0m"
        return "|".join(f"{green if m == 1 else red}{self.decode([i])}{reset}" for i, m in zip(ids, mask))

    def render_for_completion(self, conversation):
        """Prompt ids for sampling the assistant's reply: drop the last (assistant) message, prime <|assistant_start|>."""
        messages = conversation["messages"]
        assert messages and messages[-1]["role"] == "assistant", "the last message must be the assistant's (it is removed)"
        ids, _ = self.render_conversation(dict(conversation, messages=messages[:-1]))  # the caller's stays untouched
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids


def fold_system_message(messages):
    """Our format has no system role: a leading system message is folded into (a copy of) the first user message."""
    if not messages or messages[0]["role"] != "system":
        return messages
    assert len(messages) >= 2 and messages[1]["role"] == "user", "a system message must be followed by a user message"
    return [dict(messages[1], content=messages[0]["content"] + "\n\n" + messages[1]["content"])] + messages[2:]


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def open_saved(filename, what):
    """A file scripts.tok_train saved into the tokenizer dir, opened for reading; NanochatError when missing."""
    path = os.path.join(get_tokenizer_dir(), filename)
    if not os.path.exists(path):
        raise NanochatError(f"no {what} at {path}; train a tokenizer first with: python -m scripts.tok_train")
    return open(path, "rb")


def get_tokenizer():
    """The tokenizer saved by scripts.tok_train."""
    with open_saved(TOKENIZER_FILENAME, "tokenizer") as f:
        return RustBPETokenizer(pickle.load(f), "<|bos|>")


def compute_token_bytes(tokenizer):
    """Bytes per token id: the raw byte length of each regular token, 0 for special tokens (excluded from bpb)."""
    special_ids = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    counts = [0 if i in special_ids else len(tokenizer.enc.decode_single_token_bytes(i))
              for i in range(tokenizer.get_vocab_size())]
    return torch.tensor(counts, dtype=torch.int32)


def get_token_bytes(device="cpu"):
    with open_saved(TOKEN_BYTES_FILENAME, "token bytes") as f:
        return torch.load(f, map_location=device)
