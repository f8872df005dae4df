"""
Talk to a chat model in the terminal. Tokens stream as they are generated; tool calls are shown readably.

    python -m scripts.chat_cli                 # interactive, latest SFT model
    python -m scripts.chat_cli -i rl -p "What is 12*7?"   # one-shot prompt, then exit

Commands while chatting: 'quit' / 'exit' end the session, 'clear' starts a new conversation.
The helpers at the top (prompt assembly, readable streaming decode) are shared with scripts/chat_web.py.
"""

import argparse

# -----------------------------------------------------------------------------
# Shared chat helpers (also used by the web server)

ROLE_TOKENS = {"user": ("<|user_start|>", "<|user_end|>"), "assistant": ("<|assistant_start|>", "<|assistant_end|>")}


def message_chunks(tokenizer, messages):
    """One token list per message: <|user_start|> text <|user_end|> / <|assistant_start|> text <|assistant_end|>.
    A leading system message is folded into the first user message, as render_conversation does."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0], messages[1:]
        if rest:
            rest[0] = {"role": rest[0]["role"], "content": system["content"] + "\n\n" + rest[0]["content"]}
        messages = rest
    chunks = []
    for message in messages:
        start, end = ROLE_TOKENS[message["role"]]
        chunks.append([tokenizer.encode_special(start)] + tokenizer.encode(message["content"]) + [tokenizer.encode_special(end)])
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
        self.segment = []          # ids of the current run of ordinary tokens
        self.emitted = ""          # how much of the segment's decoded text was already returned
        self.open_bracket = False  # a "[calculator: ..." or "[output: ..." is shown but not yet closed
        self.after_python_end = False  # the result (if any) comes next; otherwise close the bracket

    def _flush_segment(self):
        text = self.tokenizer.decode(self.segment)[len(self.emitted):] if self.segment else ""
        self.segment, self.emitted = [], ""
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
            new, self.emitted = text[len(self.emitted):], text
            return prefix + new
        # a tool special token: close the ordinary segment, then show the tool call readably
        text = prefix + self._flush_segment()
        if token == self.python_start:
            text += self._close()
            self.open_bracket = True
            return text + "[calculator: "
        if token == self.python_end:
            self.after_python_end = True
            return text
        if token == self.output_start:
            text += self._close()
            self.open_bracket = True
            return text + "[output: "
        if token == self.output_end:
            return text + self._close()
        return text  # any other special token has no readable form

    def flush(self):
        """Whatever is still held back (a trailing partial character, an unclosed tool call)."""
        self.after_python_end = False
        return self._flush_segment() + self._close()

# -----------------------------------------------------------------------------
# Terminal chat

BANNER = "\nNanoChat Interactive Mode\n" + "-" * 50 + "\nType 'quit' or 'exit' to end the conversation\n" \
         "Type 'clear' to start a new conversation\n" + "-" * 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    # which model
    parser.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="checkpoint family to load")
    parser.add_argument("-g", "--model-tag", type=str, default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
    # what to say and how to sample
    parser.add_argument("-p", "--prompt", type=str, default="", help="one-shot prompt: answer it and exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0 = no top-k filtering)")
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="longest reply in tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (fixed, so a conversation replays the same)")
    # where to run
    parser.add_argument("--device-type", type=str, default="", choices=["cuda", "cpu", "mps", ""], help="device (default: autodetect)")
    parser.add_argument("-d", "--dtype", type=str, default="", choices=["bfloat16", "float16", "float32", ""],
                        help="compute dtype (default: chosen by nanochat.common; same as env NANOCHAT_DTYPE)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0:
        raise SystemExit(f"error: -t/--temperature {args.temperature} must be in [0, 2]")
    if args.top_k < 0:
        raise SystemExit(f"error: -k/--top-k {args.top_k} must be >= 0 (0 disables top-k)")
    if args.max_tokens < 1:
        raise SystemExit(f"error: -m/--max-tokens {args.max_tokens} must be >= 1")
    return args


def check_dtype_flag(dtype_flag):
    """The compute dtype is decided once, when nanochat.common is imported; -d can only confirm it."""
    from nanochat.common import COMPUTE_DTYPE
    if dtype_flag and str(COMPUTE_DTYPE) != f"torch.{dtype_flag}":
        raise SystemExit(f"error: -d/--dtype {dtype_flag}: the compute dtype is fixed at start-up ({COMPUTE_DTYPE}); "
                         f"run with NANOCHAT_DTYPE={dtype_flag} in the environment instead")


TRAINED_BY = {"base": "scripts.base_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}


def load_chat_model(source, device, model_tag, step):
    """load_model with a one-line error (what is missing, what to run) instead of a traceback."""
    from nanochat.checkpoint_manager import load_model
    try:
        return load_model(source, device, phase="eval", model_tag=model_tag, step=step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: could not load the -i {source} model ({e}); train one with "
                         f"python -m {TRAINED_BY[source]}, or choose another with -i/-g/-s")


def warm_up(engine, tokenizer):
    """One tiny generation, so one-time set-up (and its log lines) happens before the chat starts."""
    for _ in engine.generate([tokenizer.get_bos_token_id()], num_samples=1, max_tokens=1, temperature=0.0):
        pass


def stream_reply(engine, tokenizer, prompt, max_tokens, temperature, top_k, seed, write):
    """Generate one reply, writing display text as it comes. Returns the reply token ids (tool calls and the
    closing <|assistant_end|> included, so they can go back into the conversation)."""
    decoder = ReplyDecoder(tokenizer)
    reply = []
    for token_column, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                           top_k=top_k if top_k > 0 else None, seed=seed):
        token = token_column[0]
        reply.append(token)
        if token in decoder.stop_tokens:
            break
        write(decoder.feed(token))
    write(decoder.flush())
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    if not reply or reply[-1] != assistant_end:
        reply.append(assistant_end)  # hit the length limit: close the turn so the next one renders correctly
    return reply


def main(argv=None):
    args = parse_args(argv)
    check_dtype_flag(args.dtype)
    from nanochat.common import compute_init, autodetect_device_type
    from nanochat.engine import Engine

    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    model, tokenizer, _ = load_chat_model(args.source, device, args.model_tag, args.step)
    engine = Engine(model, tokenizer)
    warm_up(engine, tokenizer)
    context = model.config.sequence_len
    user_start, user_end = (tokenizer.encode_special(t) for t in ROLE_TOKENS["user"])

    def write(text):
        if text:
            print(text, end="", flush=True)

    print(BANNER)
    chunks = []  # token lists of the conversation's turns (replies kept with their tool calls)
    while True:
        if args.prompt:
            user_input = args.prompt
            print(f"\nUser: {user_input}")
        else:
            try:
                user_input = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!")
                break
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!")
            break
        if user_input.lower() == "clear":
            chunks = []
            print("Conversation cleared.")
            continue
        if not user_input:
            continue

        chunks.append([user_start] + tokenizer.encode(user_input) + [user_end])
        reserve = min(args.max_tokens, max(1, context // 4))  # room the reply is guaranteed to have
        prompt, dropped = assemble_prompt(tokenizer, chunks, context - reserve)
        if prompt is None:
            chunks.pop()
            print(f"\n(That message is too long for the model's {context}-token context; try a shorter one.)")
            if args.prompt:
                raise SystemExit(1)
            continue
        if dropped:
            chunks = chunks[dropped:]
            print(f"(Context full: forgot the oldest {dropped} messages.)")
        print("\nAssistant: ", end="", flush=True)
        try:
            reply = stream_reply(engine, tokenizer, prompt, min(args.max_tokens, context - len(prompt)),
                                 args.temperature, args.top_k, args.seed, write)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            chunks.pop()
            continue
        print()
        chunks.append([tokenizer.encode_special("<|assistant_start|>")] + reply)
        if args.prompt:
            break


if __name__ == "__main__":
    main()
