"""
Talk to a chat model in the terminal. Tokens stream as they are generated; tool calls are shown readably.

    python -m scripts.chat_cli                 # interactive, latest SFT model
    python -m scripts.chat_cli -i rl -p "What is 12*7?"   # one-shot prompt, then exit

Commands while chatting: 'quit' / 'exit' end the session, 'clear' starts a new conversation.
"""

import argparse
from functools import partial

from nanochat.chat import ROLE_TOKENS, message_chunks, fit_prompt, stream_reply, warm_up
from nanochat.checkpoint_manager import load_model
from nanochat.cli import add_model_flags, run
from nanochat.common import compute_init, autodetect_device_type, int_in, float_in
from nanochat.engine import Engine
from nanochat.errors import NanochatError

# -----------------------------------------------------------------------------
# Terminal chat

BANNER = "\nNanoChat Interactive Mode\n" + "-" * 50 + "\nType 'quit' or 'exit' to end the conversation\n" \
         "Type 'clear' to start a new conversation\n" + "-" * 50


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    add_model_flags(parser, default_source="sft")
    # what to say and how to sample
    parser.add_argument("-p", "--prompt", type=str, default="", help="one-shot prompt: answer it and exit")
    parser.add_argument("-t", "--temperature", type=float_in("[0, 2]"), default=0.6, help="sampling temperature (0 = greedy)")
    parser.add_argument("-k", "--top-k", type=int_in("[0, inf)"), default=50, help="top-k sampling (0 = no top-k filtering)")
    parser.add_argument("-m", "--max-tokens", type=int_in("[1, inf)"), default=256, help="longest reply in tokens")
    parser.add_argument("--seed", type=int_in("[0, 4294967295]"), default=42, help="sampling seed (fixed, so a conversation replays the same)")
    return parser.parse_args(argv)


def user_inputs(one_shot_prompt):
    """What the user says: the -p prompt once, or lines typed until end of input / Ctrl-C."""
    if one_shot_prompt:
        print(f"\nUser: {one_shot_prompt}")
        yield one_shot_prompt
        return
    while True:
        try:
            yield input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print("\nGoodbye!")
            return


def main(argv=None):
    args = parse_args(argv)
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, "eval", args.model_tag, args.step)
    engine = Engine(model, tokenizer)
    warm_up(engine, tokenizer)
    context = model.config.sequence_len
    assistant_start, assistant_end = (tokenizer.encode_special(t) for t in ROLE_TOKENS["assistant"])

    write = partial(print, end="", flush=True)
    print(BANNER)
    chunks = []  # token lists of the conversation's turns (replies kept with their tool calls)
    for user_input in user_inputs(args.prompt):
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!")
            break
        if user_input.lower() == "clear":
            chunks = []
            print("Conversation cleared.")
            continue
        if not user_input:
            continue

        chunks += message_chunks(tokenizer, [{"role": "user", "content": user_input}])
        prompt, dropped, max_tokens = fit_prompt(tokenizer, chunks, context, args.max_tokens)
        if prompt is None:
            if args.prompt:
                raise NanochatError(f"-p/--prompt is too long for the model's {context}-token context; try a shorter one")
            chunks.pop()
            print(f"\n(That message is too long for the model's {context}-token context; try a shorter one.)")
            continue
        if dropped:
            chunks = chunks[dropped:]
            print(f"(Context full: forgot the oldest {dropped} messages.)")
        print("\nAssistant: ", end="", flush=True)
        try:
            reply, _ = stream_reply(engine, tokenizer, prompt, max_tokens, args.temperature, args.top_k, args.seed, write)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            chunks.pop()
            continue
        print()
        chunks.append([assistant_start] + reply + [assistant_end])  # tool calls stay in the history


if __name__ == "__main__":
    run(main)
