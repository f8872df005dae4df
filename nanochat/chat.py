"""
Chat helpers shared by the terminal chat (scripts/chat_cli.py) and the web server (scripts/chat_web.py):
prompt assembly from messages, readable streaming decode of replies.
"""

from contextlib import closing

from nanochat.tokenizer import fold_system_message

ROLE_TOKENS = {"user": ("<|user_start|>", "<|user_end|>"), "assistant": ("<|assistant_start|>", "<|assistant_end|>")}


def message_chunks(tokenizer, messages):
    """One token list per message: <|user_start|> text <|user_end|> / <|assistant_start|> text <|assistant_end|>.
    A leading system message is folded into the first user message, as render_conversation does."""
    chunks = []
    for message in fold_system_message(list(messages)):  # callers validate that a user message follows a system one
        start, end = ROLE_TOKENS[message["role"]]
        chunks.append(tokenizer.encode(message["content"], prepend=start, append=end))
    return chunks


def assemble_prompt(tokenizer, chunks, max_prompt_tokens):
    """[BOS] + the newest whole turns that fit in max_prompt_tokens + <|assistant_start|>.
    Older turns are dropped a user/assistant pair at a time so the prompt always starts with a user turn
    (the model never sees a history longer than its context). Returns (tokens, dropped_messages) or
    (None, len(chunks)) when even the last user message alone does not fit."""
    bos = tokenizer.get_bos_token_id()
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    for first in range(0, len(chunks), 2):
        body = [t for chunk in chunks[first:] for t in chunk]
        if 1 + len(body) + 1 <= max_prompt_tokens:
            return [bos] + body + [assistant_start], first
    return None, len(chunks)


def fit_prompt(tokenizer, chunks, context, max_tokens):
    """assemble_prompt for a model with a `context`-token window, keeping room for the reply: max_tokens, or a
    quarter of the context if that is less. Returns (prompt or None, dropped_messages, the reply's max_tokens)."""
    prompt, dropped = assemble_prompt(tokenizer, chunks, context - min(max_tokens, max(1, context // 4)))
    if prompt is None:
        return None, dropped, 0
    return prompt, dropped, min(max_tokens, context - len(prompt))


class ReplyDecoder:
    """Turns generated token ids into display text, one call per token.
    - UTF-8 safe: text is only emitted once it no longer ends in a partial character (U+FFFD), so an emoji
      split over several tokens arrives whole.
    - Tool calls are readable instead of raw special tokens: <|python_start|>expr<|python_end|>
      <|output_start|>result<|output_end|> is shown as "[calculator: expr = result]" (no result: "[calculator: expr]").
    - The terminal tokens (<|assistant_end|>, <|bos|>) are never shown: the caller stops on them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.other_special = {special(name) for name in tokenizer.get_special_tokens()} - self.stop_tokens
        self.openers = {self.python_start: "[calculator: ", self.output_start: "[output: "}
        self.segment = []          # ids of ordinary tokens not shown yet (the start of a multi-byte character)
        self.open_bracket = False  # a "[calculator: ..." or "[output: ..." is shown but not yet closed
        self.after_python_end = False  # the result (if any) comes next; otherwise close the bracket

    def _flush_segment(self):
        text = self.tokenizer.decode(self.segment) if self.segment else ""
        self.segment = []
        return text

    def _close(self):
        closing = "]" if self.open_bracket else ""
        self.open_bracket = False
        return closing

    def feed(self, token):
        if token in self.stop_tokens:
            return self.flush()
        prefix = ""
        if self.after_python_end:
            self.after_python_end = False
            if token == self.output_start:
                return " = "
            prefix = self._close()  # the calculator gave no result
        if token not in self.other_special:
            self.segment.append(token)
            text = self.tokenizer.decode(self.segment)
            if text.endswith("\ufffd"):
                return prefix  # wait for the rest of a multi-byte character
            self.segment = []  # whole characters: what follows decodes on its own
            return prefix + text
        # a tool special token: close the ordinary segment, then show the tool call readably
        # (any other special token has no readable form)
        text = prefix + self._flush_segment()
        if token in self.openers:
            text += self._close() + self.openers[token]
            self.open_bracket = True
        elif token == self.python_end:
            self.after_python_end = True
        elif token == self.output_end:
            text += self._close()
        return text

    def flush(self):
        """Whatever is still held back (a trailing partial character, an unclosed tool call)."""
        self.after_python_end = False
        return self._flush_segment() + self._close()


def warm_up(engine, tokenizer):
    """One tiny generation, so one-time set-up (and its log lines) happens before the chat starts."""
    list(engine.generate([tokenizer.get_bos_token_id()], num_samples=1, max_tokens=1, temperature=0.0))


class Reply:
    """A reply as it is generated: its token ids (tool calls included, the closing <|assistant_end|> not) and its
    text, handed to write() as soon as it is displayable."""

    def __init__(self, tokenizer, write):
        self.decoder, self.write, self.tokens = ReplyDecoder(tokenizer), write, []

    def feed(self, token):
        """Take the next generated token; returns True when it ends the reply (it is then not kept)."""
        if token in self.decoder.stop_tokens:
            return True
        self.tokens.append(token)
        text = self.decoder.feed(token)
        if text:
            self.write(text)
        return False

    def close(self):
        """Write whatever is still held back."""
        tail = self.decoder.flush()
        if tail:
            self.write(tail)


def stream_reply(engine, tokenizer, prompt, max_tokens, temperature, top_k, seed, write):
    """Generate one reply, writing display text as it comes. Returns (tokens, finish): the reply's token ids (tool
    calls included, the closing <|assistant_end|> not) and "stop" (the model ended its turn) or "length" (max_tokens
    or the context reached)."""
    reply, finish = Reply(tokenizer, write), "length"
    with closing(engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k if top_k > 0 else None, seed=seed)) as generator:
        for token_column, _ in generator:
            if reply.feed(token_column[0]):
                finish = "stop"
                break
    reply.close()
    return reply.tokens, finish
