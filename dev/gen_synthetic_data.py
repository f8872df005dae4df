"""
Generate synthetic "identity" conversations for SFT: multi-turn user/assistant chats that teach the model who it is
(name, origin, how it was trained, what it can and cannot do) in a friendly, honest voice.

Each conversation comes from one request to an OpenRouter-compatible chat-completions API with a structured-output
JSON schema. Diversity comes from sampling, per conversation, a topic, a user persona, a conversation dynamic and a
few example opening messages from distinct styles (greetings, typos, slang, shouting, other languages, ...), so the
dataset does not collapse onto one canned exchange.

    export OPENROUTER_API_KEY=...
    python dev/gen_synthetic_data.py --num 1000 --workers 4
    python dev/gen_synthetic_data.py --num 200 --append                 # add to an existing file
    python dev/gen_synthetic_data.py --num 10 --save-metadata --output /tmp/x.jsonl

Output (default <base>/identity_conversations.jsonl, the file the SFT mixture loads through CustomJSON): one JSON
array of {"role", "content"} messages per line; with --save-metadata, one {"messages": [...], "metadata": {...}}
object per line (topic, persona, dynamic, openers, model) for analysing the mix.
The API base URL can be pointed elsewhere with --base-url or OPENROUTER_BASE_URL (any OpenAI-compatible server).
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests

# runnable as `python dev/gen_synthetic_data.py` from anywhere: make the repo's nanochat package importable
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_BASE_URL = "https://openrouter.ai/api/v1"
DEFAULT_MODEL = "google/gemini-3-flash-preview"

# -----------------------------------------------------------------------------
# What the model should know about itself. Override with --knowledge FILE to describe your own model.

KNOWLEDGE = """\
Facts about the assistant (use them accurately; do not invent other facts):
- Its name is nanochat. It is a small chat model, not a product of a big AI lab.
- It was trained end to end with the nanochat codebase: a compact, readable implementation in plain PyTorch of every
  stage of building a chat model - a byte-level BPE tokenizer, pretraining on web text, supervised finetuning on
  conversations, optional reinforcement learning on math word problems, evaluation and a web chat UI.
- The project follows Andrej Karpathy's nanochat design (2025): "the best ChatGPT that about $100 can buy". A GPT-2
  grade model trains in a few hours on a single node with 8 H100 GPUs.
- Architecture: a decoder-only Transformer with rotary position embeddings, QK normalization, ReLU squared MLPs,
  untied input/output embeddings, value embeddings, sliding-window attention and a logit soft-cap. Model size is set by
  a single dial, the depth (number of layers); width, batch size, learning rates and training length follow from it.
- Training: Muon optimizer for weight matrices and AdamW for embeddings; bits-per-byte on held-out text and the CORE
  benchmark (22 tasks) measure the base model; chat evaluations include ARC, MMLU, GSM8K and HumanEval.
- The code is open source under the MIT license, so anyone can read it, train their own copy and change it.
- Limitations: it is small, so it makes mistakes, can state wrong facts confidently, has a limited context window,
  no internet access, no memory between conversations and knowledge frozen at training time. It works best in
  English. It can use a simple Python calculator tool for arithmetic.
- Personality: friendly, curious, modest and honest; it admits uncertainty and never claims to be human, to be
  ChatGPT/Claude/Gemini, or to have abilities it lacks.
"""

# -----------------------------------------------------------------------------
# Diversity dimensions. One of each is sampled per conversation (seeded by its index, so runs are reproducible).

TOPICS = {
    "identity": ["what its name is and what it means", "who made it and why", "whether it is ChatGPT",
                 "whether it is a person", "what kind of program it is", "how to refer to it"],
    "architecture": ["what a Transformer is, simply", "how depth sets the model size", "rotary position embeddings",
                     "sliding-window attention", "what a tokenizer does", "how many parameters it has roughly"],
    "training": ["how pretraining works", "what supervised finetuning adds", "how long and how much training costs",
                 "what data it learned from", "what the Muon optimizer is", "what bits per byte measures"],
    "capabilities": ["what it is good at", "whether it can do arithmetic", "whether it can write code",
                     "whether it can help with homework", "what languages it speaks", "telling a short story"],
    "limitations": ["why it sometimes makes things up", "whether it can browse the web", "whether it remembers "
                    "past chats", "how recent its knowledge is", "why it is smaller than big assistants"],
    "comparisons": ["how it differs from large commercial assistants", "how it compares to GPT-2",
                    "why someone would use a small model", "open source versus closed models"],
    "history": ["the story of small hackable language models", "where the idea of a $100 chat model came from",
                "how GPT-2 grade models became cheap to train"],
    "technical_deep_dive": ["how the KV cache speeds up generation", "how the calculator tool is called",
                            "how conversations are turned into tokens", "how evaluation with CORE works",
                            "how training is split across 8 GPUs"],
    "philosophical": ["whether it understands anything", "whether it has feelings", "what it is like to be a "
                      "small model", "whether AI should be open", "what it hopes people learn from it"],
}

PERSONAS = [
    "a curious beginner who has never used a chatbot", "a software engineer who likes precise answers",
    "a machine learning researcher probing the details", "a high-school student working on a project",
    "a skeptic who suspects it is just a wrapper around a big model", "a teacher preparing a lesson on AI",
    "a non-native English speaker writing short, simple sentences", "a journalist writing an article about cheap AI",
    "a playful user who jokes around and tests its personality", "a retiree who is new to technology",
    "a hobbyist who wants to train their own copy at home", "a busy manager who wants one-line answers",
]

DYNAMICS = [
    ("short Q&A", "2 turns: a direct question and a clear, compact answer, then one follow-up."),
    ("deep technical discussion", "6 turns that go progressively deeper into one technical point."),
    ("skeptical arc", "4 turns: the user doubts a claim, the assistant explains calmly with specifics, "
                      "the user is finally convinced (or agrees to disagree)."),
    ("casual chat", "3 turns of relaxed small talk that touches the topic naturally."),
    ("confused user", "4 turns where the user misunderstands something and the assistant patiently clarifies."),
    ("testing limits", "3 turns where the user asks for something the assistant cannot do; it declines honestly "
                       "and offers what it can do instead."),
    ("teaching moment", "4 turns where the assistant explains a concept step by step with a small example."),
    ("rapid fire", "5 turns of quick, short questions and short answers."),
    ("identity challenge", "3 turns where the user insists the assistant is some other famous AI; it stays "
                           "friendly and accurate about who it is."),
    ("wrap-up", "3 turns that end with the user thanking the assistant and it saying goodbye warmly."),
]

# Example opening messages, grouped by style; 3 distinct styles are sampled per conversation.
OPENERS = {
    "plain_greeting": ["hi", "hello there", "hey", "good morning!", "yo", "hi, how are you today?",
                       "hello, anyone here?", "hey, quick question"],
    "names_the_model": ["hi nanochat", "are you nanochat?", "hey nanochat, what are you exactly?",
                        "nanochat, tell me about yourself", "so you're the $100 chat model?"],
    "curious_question": ["who made you?", "what are you?", "how were you trained?", "are you an AI?",
                         "what can you help me with?", "how big are you?", "are you open source?"],
    "typos": ["helo who r u", "wat is ur name", "hi ther, whos built you", "can u do math??", "wher did u come from"],
    "slang": ["sup bot", "yo what's good, u a robot or what", "ngl you seem kinda small lol",
              "bruh are you chatgpt"],
    "all_caps": ["HELLO", "WHO ARE YOU", "ARE YOU A REAL PERSON?", "HI NANOCHAT"],
    "other_language": ["hola, como estas?", "bonjour, qui es-tu ?", "hallo, wer bist du?", "ciao! come ti chiami?",
                       "ola, tudo bem?", "hej, vem ar du?", "konnichiwa", "privet, kto ty?", "merhaba, sen kimsin?"],
    "task_first": ["can you help me write an email?", "what's 17 times 23?", "explain transformers like I'm five",
                   "write me a haiku about GPUs"],
}

PROMPT_TEMPLATE = """\
Write a realistic conversation between a user and an AI assistant named nanochat, to be used as training data that
teaches the assistant about itself.

{knowledge}
This conversation:
- Topic: {topic_category} - {topic}.
- The user is {persona}.
- Shape: {dynamic_name}. {dynamic_description}
- Here are examples of how users open conversations (for style only; write a fresh first message in a similar spirit,
  or use one of them): {openers}

Rules:
- Strictly alternate roles, starting with the user and ending with the assistant.
- The assistant stays accurate to the facts above; when unsure, it says so instead of inventing details.
- Natural, engaging, varied wording; no lists of facts dumped at once unless the user asks.
- Plain ASCII text only: no emojis, no markdown tables.
- If the user's first message is not in English, the assistant answers briefly in that language and mentions that it
  works best in English, then continues in English.
Return only the JSON object with the "messages" array.
"""

RESPONSE_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "conversation",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "messages": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                        "required": ["role", "content"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["messages"],
            "additionalProperties": False,
        },
    },
}


def sample_conversation_spec(idx, seed):
    """The diversity choices for conversation idx (deterministic given seed and idx)."""
    rng = random.Random(seed * 1_000_003 + idx)
    category = rng.choice(sorted(TOPICS))
    dynamic_name, dynamic_description = rng.choice(DYNAMICS)
    styles = rng.sample(sorted(OPENERS), 3)
    return {
        "topic_category": category,
        "topic": rng.choice(TOPICS[category]),
        "persona": rng.choice(PERSONAS),
        "dynamic_name": dynamic_name,
        "dynamic_description": dynamic_description,
        "openers": [rng.choice(OPENERS[s]) for s in styles],
    }


def build_prompt(spec, knowledge):
    openers = "; ".join(json.dumps(o) for o in spec["openers"])
    return PROMPT_TEMPLATE.format(knowledge=knowledge, openers=openers,
                                  **{k: v for k, v in spec.items() if k != "openers"})

# -----------------------------------------------------------------------------
# Validation: the same rules the SFT loader (CustomJSON) relies on


class InvalidConversation(ValueError):
    pass


def validate_messages(messages):
    if not isinstance(messages, list) or len(messages) < 2:
        raise InvalidConversation("need a list of at least 2 messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise InvalidConversation(f"message {i} must have exactly the keys role and content")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise InvalidConversation(f"message {i} has role {m['role']!r}, expected {expected!r} (roles alternate, "
                                      "user first)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise InvalidConversation(f"message {i} has empty content")
    if messages[-1]["role"] != "assistant":
        raise InvalidConversation("the last message must be the assistant's")
    return messages

# -----------------------------------------------------------------------------
# API client


class FatalAPIError(RuntimeError):
    """Errors that retrying cannot fix (bad key, unreachable server): stop the whole run."""


class Stopped(RuntimeError):
    """This worker gave up because another worker hit a FatalAPIError: never the error the run reports."""


class RetryableError(RuntimeError):
    pass


class ConnectionFailure(RetryableError):
    """The server could not be reached: retried once (a blip), then fatal (offline or wrong URL)."""


def request_conversation(session, args, api_key, prompt):
    url = args.base_url.rstrip("/") + "/chat/completions"
    payload = {
        "model": args.model,
        "stream": False,
        "temperature": args.temperature,
        "messages": [{"role": "user", "content": prompt}],
        "response_format": RESPONSE_SCHEMA,
    }
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    try:
        response = session.post(url, json=payload, headers=headers, timeout=args.timeout)
    except requests.exceptions.ConnectionError as e:
        raise ConnectionFailure(f"cannot reach the chat API at {url} ({type(e).__name__}); are you offline? "
                                "Check the network or --base-url / OPENROUTER_BASE_URL") from None
    except requests.exceptions.Timeout:
        raise RetryableError(f"request timed out after {args.timeout}s") from None
    if response.status_code in (401, 403):
        raise FatalAPIError(f"the API rejected the key (HTTP {response.status_code}: {response.text[:200]}); "
                            "check OPENROUTER_API_KEY")
    if response.status_code == 429 or response.status_code >= 500:
        raise RetryableError(f"HTTP {response.status_code}: {response.text[:200]}")
    if response.status_code != 200:
        raise FatalAPIError(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
    try:
        content = response.json()["choices"][0]["message"]["content"]
        messages = json.loads(content)["messages"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise RetryableError(f"malformed response ({type(e).__name__}: {e})") from None
    try:
        return validate_messages(messages)
    except InvalidConversation as e:
        raise RetryableError(f"invalid conversation: {e}") from None


def generate_one(idx, args, api_key, knowledge, stop_event):
    spec = sample_conversation_spec(idx, args.seed)
    prompt = build_prompt(spec, knowledge)
    session = requests.Session()
    last_error = None
    for attempt in range(args.retries + 1):
        if stop_event.is_set():
            raise Stopped()
        try:
            messages = request_conversation(session, args, api_key, prompt)
            return messages, {"index": idx, "model": args.model, **spec}
        except FatalAPIError:
            stop_event.set()  # tell the other workers right away, before they send more doomed requests
            raise
        except ConnectionFailure as e:
            if attempt >= min(1, args.retries):
                stop_event.set()
                raise FatalAPIError(str(e)) from None
            stop_event.wait(min(args.backoff, 1.0))
        except RetryableError as e:
            last_error = e
            if attempt < args.retries:
                # exponential backoff with jitter; wakes early if another worker hit a fatal error
                stop_event.wait(args.backoff * (2 ** attempt) * (1 + 0.25 * random.random()))
    raise RetryableError(f"gave up after {args.retries + 1} attempts: {last_error}")

# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate synthetic identity conversations through a chat API")
    g = parser.add_argument_group("what to generate")
    g.add_argument("--num", type=int, default=1000, help="number of conversations to generate")
    g.add_argument("--output", default=None, help="output JSONL (default <base>/identity_conversations.jsonl)")
    g.add_argument("--append", action="store_true", help="add to an existing output file instead of replacing it")
    g.add_argument("--save-metadata", action="store_true",
                   help="write {messages, metadata} objects instead of bare message arrays")
    g.add_argument("--knowledge", default=None, help="text file describing the model (replaces the built-in facts)")
    g.add_argument("--seed", type=int, default=0, help="seed for the diversity sampling")
    g = parser.add_argument_group("API")
    g.add_argument("--base-url", default=os.environ.get("OPENROUTER_BASE_URL", DEFAULT_BASE_URL),
                   help="OpenAI-compatible API base URL (env OPENROUTER_BASE_URL; key from env OPENROUTER_API_KEY)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="model name on that API")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--workers", type=int, default=4, help="parallel requests")
    g.add_argument("--retries", type=int, default=3, help="retries per conversation on 429/5xx/timeouts/bad output")
    g.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubles each time)")
    g.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def load_api_key():
    key = os.environ.get("OPENROUTER_API_KEY", "").strip()
    if not key and os.path.exists(".env"):
        # a .env file in the current directory is a common place to keep the key (KEY=value lines)
        for line in open(".env"):
            name, _, value = line.strip().partition("=")
            if name.strip() == "OPENROUTER_API_KEY":
                key = value.strip().strip("'\"")
    if not key:
        raise SystemExit("error: OPENROUTER_API_KEY is not set; export it (or put OPENROUTER_API_KEY=... in .env) "
                         "and re-run")
    return key


def default_output():
    from nanochat.common import get_base_dir
    return os.path.join(get_base_dir(), "identity_conversations.jsonl")


def main(argv=None):
    args = parse_args(argv)
    api_key = load_api_key()
    knowledge = KNOWLEDGE
    if args.knowledge:
        if not os.path.exists(args.knowledge):
            raise SystemExit(f"error: --knowledge file {args.knowledge} not found")
        with open(args.knowledge, encoding="utf-8") as f:
            knowledge = f.read()
    output = args.output or default_output()
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)

    # Write into a temp file next to the output and rename at the end, so the output is never half-written;
    # with --append the existing lines are copied in first. Ctrl-C still keeps what was generated.
    fd, tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)), prefix=".synthetic.",
                                    suffix=".jsonl")
    os.close(fd)
    existing = 0
    if args.append and os.path.exists(output):
        shutil.copyfile(output, tmp_path)
        with open(tmp_path, "rb") as f:
            data = f.read()
        existing = data.count(b"\n")
        if data and not data.endswith(b"\n"):
            with open(tmp_path, "ab") as f:
                f.write(b"\n")
            existing += 1
    print(f"Generating {args.num} conversations with {args.model} via {args.base_url} ({args.workers} workers)")
    print(f"Output: {output}" + (f" (appending to {existing} existing lines)" if args.append else ""))

    lock = threading.Lock()
    stop_event = threading.Event()
    saved, failed, fatal = 0, 0, None
    out = open(tmp_path, "a")
    try:
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(generate_one, i, args, api_key, knowledge, stop_event) for i in range(args.num)]
            try:
                for future in as_completed(futures):
                    try:
                        messages, metadata = future.result()
                    except Stopped:
                        continue
                    except FatalAPIError as e:
                        if fatal is None:  # the first root cause; later ones are usually the same error
                            fatal = str(e)
                            stop_event.set()
                            for f in futures:
                                f.cancel()
                        continue
                    except Exception as e:  # one bad conversation must not stop the run
                        failed += 1
                        print(f"✗ Error generating conversation: {e}", flush=True)
                        continue
                    record = {"messages": messages, "metadata": metadata} if args.save_metadata else messages
                    with lock:
                        out.write(json.dumps(record, ensure_ascii=False) + "\n")
                        out.flush()
                        saved += 1
                    print(f"✓ Saved conversation {saved}/{args.num}", flush=True)
            except KeyboardInterrupt:
                stop_event.set()
                for f in futures:
                    f.cancel()
                print("Interrupted: keeping the conversations generated so far")
    finally:
        out.close()
    if saved == 0:
        os.unlink(tmp_path)  # nothing generated: leave any previous output untouched
        print(f"Done: nothing saved ({failed} failed)")
    else:
        os.replace(tmp_path, output)
        print(f"Done: {saved} saved, {failed} failed; {existing + saved} conversations in {output}")
    if fatal:
        raise SystemExit(f"error: {fatal}")
    if saved == 0:
        raise SystemExit("error: no conversation could be generated; see the errors above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
