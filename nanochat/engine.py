"""
Fast inference: a KV cache, batched sampling, and the calculator tool state machine.

The engine works on token ids. It needs from the model: `config` (n_kv_head, n_head, n_embd, n_layer,
sequence_len), `get_device()`, and `forward(ids, kv_cache=...)` returning (B, T, V) logits while writing and
advancing the cache (whose rows may sit at different positions, `kv_cache.lengths`); from the tokenizer: `encode_special`, `get_bos_token_id`, `encode(str)`, `decode(ids)`.

Generation runs in a Batch: rows of different prompts, each at its own position with its own sampling settings,
share every decode forward. A prompt is prefilled once with batch size 1 and copied into one row per sample; every
row samples independently from there and leaves the batch when it ends, freeing its row for the next prompt.
A row that writes <|python_start|> expr <|python_end|> gets the calculator's answer forced into its stream as
<|output_start|> result <|output_end|> (mask 0 = forced). Engine.generate streams one prompt, generate_many runs
many (chat_eval, chat_rl), and a long-lived Batch serves the web server's requests as they come and go.
"""

import ast
import operator
import argparse
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.cli import run
from nanochat.common import COMPUTE_DTYPE, autodetect_device_type, int_in
from nanochat.errors import NanochatError
from nanochat.checkpoint_manager import load_model


# -----------------------------------------------------------------------------------------------------
# calculator tool: parsed and evaluated by walking a whitelisted AST. No eval(), so there is nothing to time out
# (a signal-based timer would only work in the main thread) and it is safe from any thread.

MAX_EXPRESSION_CHARS = 256
MAX_RESULT_DIGITS = 64
_STRING_METHODS = {"lower", "upper", "strip"}  # allowed before .count(...), e.g. "Banana".lower().count("a")
_BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_arithmetic(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval_arithmetic(node.operand)
        return value if isinstance(node.op, ast.UAdd) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        result = _BINARY_OPS[type(node.op)](_eval_arithmetic(node.left), _eval_arithmetic(node.right))
        if isinstance(result, int) and len(str(abs(result))) > MAX_RESULT_DIGITS:
            raise ValueError("result too large")
        return result
    raise ValueError(f"unsupported arithmetic: {ast.dump(node)[:60]}")


def _eval_string_receiver(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STRING_METHODS
            and not node.args and not node.keywords):
        return getattr(_eval_string_receiver(node.func.value), node.func.attr)()
    raise ValueError("unsupported string expression")


def _eval_count(call):
    # <string expr>.count(<str constant>[, <int start>[, <int end>]])
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "count"
            and not call.keywords and 1 <= len(call.args) <= 3
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
        raise ValueError("only <string>.count(<string literal>[, start[, end]]) is supported")
    bounds = [_eval_arithmetic(a) for a in call.args[1:]]
    if not all(isinstance(b, int) for b in bounds):
        raise ValueError("count bounds must be integers")
    return _eval_string_receiver(call.func.value).count(call.args[0].value, *bounds)


def use_calculator(expr):
    """Evaluate a calculator expression the model wrote; returns the value or None when unsupported/invalid.
    Arithmetic: digits, + - * / ( ) . and spaces (no **); digit-grouping commas are dropped ("1,000" -> 1000).
    Strings: `"text".count("t")` (optionally after .lower()/.upper()/.strip()). Commas inside string literals are
    kept, so "a,b".count(",") works."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    expr = expr.strip()
    try:
        if '"' not in expr and "'" not in expr:
            expr = expr.replace(",", "")
            # the character whitelist also keeps out literals such as 1e9 or 0x10; ** is not an allowed operator
            if not expr or any(c not in "0123456789*+-/.() " for c in expr):
                return None
            return _eval_arithmetic(ast.parse(expr, mode="eval").body)
        return _eval_count(ast.parse(expr, mode="eval").body)  # anything but <string>.count(...) is refused
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError, RecursionError, MemoryError):
        return None


# -----------------------------------------------------------------------------------------------------
# KV cache

class KVCache:
    """Per-layer K/V storage for up to `batch_size` rows, (num_layers, batch_size, seq_len, H_kv, D): the layout
    FA3's kv-cache API expects. The rows in use are the first len(lengths) (at first all of them, empty), each with
    its own length, so one cache can hold different prompts at different positions. Also carries each row's last
    pre-smear embedding for the model's smear."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=COMPUTE_DTYPE):
        self.batch_size, self.seq_len, self.n_layers = batch_size, seq_len, num_layers
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.all_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.cache_seqlens = self.all_seqlens  # the rows in use (a view: advance() updates it in place)
        self.lengths = [0] * batch_size        # python mirror of cache_seqlens (no device sync to read it)
        self.prev_embedding = None             # (rows in use, 1, C), set by the model

    def truncate(self, num_rows):
        """Keep the first num_rows rows in use."""
        self.cache_seqlens, self.lengths = self.all_seqlens[:num_rows], self.lengths[:num_rows]
        if self.prev_embedding is not None:
            self.prev_embedding = self.prev_embedding[:num_rows]

    def get_layer_cache(self, layer_idx):
        rows = len(self.lengths)
        return self.k_cache[layer_idx, :rows], self.v_cache[layer_idx, :rows]

    def advance(self, num_tokens):
        if max(self.lengths) + num_tokens > self.seq_len:
            raise ValueError(f"KV cache overflow: {max(self.lengths)} + {num_tokens} > {self.seq_len}")
        self.cache_seqlens += num_tokens
        self.lengths = [n + num_tokens for n in self.lengths]

    def append_rows(self, prefilled, count):
        """Use `count` more rows, each a copy of a batch-1 cache's content (a prefilled prompt)."""
        first, n = len(self.lengths), prefilled.lengths[0]
        self.k_cache[:, first:first + count, :n] = prefilled.k_cache[:, :, :n]
        self.v_cache[:, first:first + count, :n] = prefilled.v_cache[:, :, :n]
        self.all_seqlens[first:first + count] = n
        self.cache_seqlens, self.lengths = self.all_seqlens[:first + count], self.lengths + [n] * count
        if prefilled.prev_embedding is not None:
            new = prefilled.prev_embedding.expand(count, -1, -1)
            self.prev_embedding = torch.cat([self.prev_embedding, new]) if first else new.clone()

    def remove_row(self, row):
        """Free a row: the last row in use moves into its place, so the rows in use stay the first ones."""
        last = len(self.lengths) - 1
        if row != last:
            n = self.lengths[last]
            self.k_cache[:, row, :n] = self.k_cache[:, last, :n]
            self.v_cache[:, row, :n] = self.v_cache[:, last, :n]
            self.all_seqlens[row], self.lengths[row] = self.all_seqlens[last], n
            if self.prev_embedding is not None:
                self.prev_embedding[row] = self.prev_embedding[last]
        self.truncate(last)


# -----------------------------------------------------------------------------------------------------
# sampling

def tempered_probs(logits, temperature):
    """softmax(logits / temperature) for any temperature > 0. The best logit is moved to 0 first, else a temperature
    near 0 (below ~1e-38 for fp32 logits) makes logits / temperature overflow to inf and the probabilities NaN; it
    stays 0 where the temperature itself rounds to 0 in the logits' dtype (0 / 0 would be NaN)."""
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    return F.softmax(torch.where(shifted == 0, shifted, shifted / temperature), dim=-1)


@torch.inference_mode()
def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> next ids (B, 1). temperature 0 = argmax; top_k restricts sampling to the k best."""
    assert temperature >= 0.0, "temperature must be non-negative"
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(tempered_probs(values, temperature), num_samples=1, generator=rng)
        return indices.gather(1, choice)
    return torch.multinomial(tempered_probs(logits, temperature), num_samples=1, generator=rng)


# -----------------------------------------------------------------------------------------------------
# engine: generations of many prompts decoded together

@dataclass(eq=False)
class Request:
    """One prompt's generation: num_samples rows sampled with one random generator; done once every row has ended."""
    prompt: list
    num_samples: int
    max_tokens: int | None
    temperature: float
    top_k: int | None
    rng: torch.Generator
    running: int = 0  # rows still generating
    done: bool = False


@dataclass(eq=False)
class Row:
    """One sequence being generated: sample `sample` of `request`."""
    request: Request
    sample: int
    token: int = None    # the last token, fed to the next forward
    generated: int = 0
    forced: list = field(default_factory=list)  # tokens to emit instead of sampling (the calculator's answer)
    expression: list = None  # tokens written inside <|python_start|> ... <|python_end|> (None outside a block)


class Batch:
    """Generations of different prompts decoded together: each step is one forward over every row in use (each row
    at its own position), then one new token per row. A request waits until its rows are free, is prefilled on its
    own (batch 1, as one-prompt generation always was) and copied into its rows; a row is freed as soon as it ends
    (a stop token, its request's max_tokens, or a full row), so the next request can join at the next step."""

    def __init__(self, engine, max_rows, seq_len):
        self.engine, self.model = engine, engine.model
        self.cache = engine.new_cache(max_rows, seq_len)
        self.cache.truncate(0)
        self.rows = []           # rows[i] lives in the cache's row i
        self.waiting = deque()   # requests not admitted yet, first come first served

    def add(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Queue a prompt; it joins at the next step with free rows. Returns its Request."""
        if num_samples > self.cache.batch_size or len(tokens) > self.cache.seq_len:
            raise ValueError(f"{num_samples} samples of a {len(tokens)}-token prompt do not fit a batch of "
                             f"{self.cache.batch_size} rows of {self.cache.seq_len} tokens")
        rng = torch.Generator(device=self.model.get_device()).manual_seed(seed)
        request = Request(list(tokens), num_samples, max_tokens, temperature, top_k, rng)
        self.waiting.append(request)
        return request

    @torch.inference_mode()
    def cancel(self, request):
        """End a request now: its rows are freed (or it leaves the queue)."""
        if request in self.waiting:
            self.waiting.remove(request)
        for i in reversed(range(len(self.rows))):
            if self.rows[i].request is request:
                self._free(i)
        request.done = True

    def clear(self):
        """Drop every request at once (after a failed step): all rows free, nobody waiting."""
        self.cache.truncate(0)
        self.rows, self.waiting = [], deque()

    @torch.inference_mode()
    def step(self):
        """Feed every row its last token, admit the waiting requests that fit, sample one token per row. Returns
        [(request, column, masks)] for every request with rows: column[i] is sample i's new token (None once that
        sample has ended), masks[i] is 1 if it was sampled, 0 if forced (the calculator's answer)."""
        logits = []
        if self.rows:
            ids = torch.tensor([[row.token] for row in self.rows], dtype=torch.long, device=self.model.get_device())
            logits.append(self.model.forward(ids, kv_cache=self.cache)[:, -1, :])
        logits += self._admit()
        if not self.rows:
            return []
        sampled = self._sample(torch.cat(logits))
        outputs, ended = {}, []
        for i, row in enumerate(self.rows):
            request = row.request
            column, masks = outputs.setdefault(request, ([None] * request.num_samples, [None] * request.num_samples))
            column[row.sample], masks[row.sample] = self._next_token(row, sampled[i])
            row_full = self.cache.lengths[i] >= self.cache.seq_len  # no room to feed the token back
            if row.token in self.engine.stop_tokens or row.generated == request.max_tokens or row_full:
                ended.append(i)
        for i in reversed(ended):  # highest first: the rows moved into freed places have not ended
            request = self.rows[i].request
            request.running -= 1
            request.done = request.running == 0
            self._free(i)
        return [(request, column, masks) for request, (column, masks) in outputs.items()]

    def _admit(self):
        """Prefill the waiting requests whose rows fit; returns their first logits, one row per sample."""
        logits = []
        while self.waiting and len(self.rows) + self.waiting[0].num_samples <= self.cache.batch_size:
            request = self.waiting.popleft()
            prefill = self.engine.new_cache(1, len(request.prompt))
            ids = torch.tensor([request.prompt], dtype=torch.long, device=self.model.get_device())
            logits.append(self.model.forward(ids, kv_cache=prefill)[:, -1, :].expand(request.num_samples, -1))
            self.cache.append_rows(prefill, request.num_samples)
            self.rows += [Row(request, sample) for sample in range(request.num_samples)]
            request.running = request.num_samples
        return logits

    def _sample(self, logits):
        """One sampled token per row. Each request samples its rows, in sample order, with its own generator, so its
        tokens do not depend on what else is in the batch."""
        if all(row.request.temperature == 0 for row in self.rows):
            return sample_next_token(logits, None, 0.0)[:, 0].tolist()  # all greedy: one argmax
        groups = {}
        for i, row in sorted(enumerate(self.rows), key=lambda item: item[1].sample):
            groups.setdefault(row.request, []).append(i)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        for request, rows in groups.items():
            rows = torch.tensor(rows, device=logits.device)
            tokens[rows] = sample_next_token(logits[rows], request.rng, request.temperature, request.top_k)[:, 0]
        return tokens.tolist()

    def _next_token(self, row, sampled):
        """The row's next token and mask: forced (0) or sampled (1). Runs the calculator tool state machine."""
        engine = self.engine
        token, mask = (row.forced.pop(0), 0) if row.forced else (sampled, 1)
        if token == engine.python_start:
            row.expression = []
        elif token == engine.python_end and row.expression is not None:
            result = use_calculator(engine.tokenizer.decode(row.expression)) if row.expression else None
            if result is not None:
                row.forced += [engine.output_start, *engine.tokenizer.encode(str(result)), engine.output_end]
            row.expression = None
        elif row.expression is not None:
            row.expression.append(token)
        row.token = token
        row.generated += 1
        return token, mask

    def _free(self, i):
        self.cache.remove_row(i)
        self.rows[i] = self.rows[-1]
        self.rows.pop()


class Engine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        special = tokenizer.encode_special
        # a row's turn ends at <|assistant_end|>, or at BOS (a new document) for a base model
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def new_cache(self, batch_size, seq_len):
        cfg = self.model.config
        return KVCache(batch_size, num_heads=cfg.n_kv_head, seq_len=seq_len, head_dim=cfg.n_embd // cfg.n_head,
                       num_layers=cfg.n_layer, device=self.model.get_device())

    def new_batch(self, max_rows, seq_len=None):
        """An empty Batch of max_rows rows of seq_len tokens (default: the model's context)."""
        return Batch(self, max_rows, seq_len or self.model.config.sequence_len)

    def row_length(self, tokens, max_tokens):
        """Tokens a row needs: the prompt and max_tokens (no limit: the model's context, at least one new token)."""
        return len(tokens) + max_tokens if max_tokens is not None else max(self.model.config.sequence_len, len(tokens) + 1)

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks) for one prompt: one token per sample per step (None once that sample
        has ended); mask 1 = sampled, 0 = forced."""
        batch = self.new_batch(num_samples, self.row_length(tokens, max_tokens))
        request = batch.add(tokens, num_samples, max_tokens, temperature, top_k, seed)
        while not request.done:
            for _, column, masks in batch.step():
                yield column, masks

    def generate_many(self, prompts, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seeds=None,
                      max_rows=32):
        """generate_batch for many prompts, decoded together in one Batch of max_rows rows (at least num_samples).
        Yields (prompt index, results, masks) as each prompt's samples have all ended; seeds: one per prompt
        (default 42 for each, as generate_batch)."""
        prompts = list(prompts)
        seeds = [42] * len(prompts) if seeds is None else seeds
        rows = max(num_samples, min(max_rows, num_samples * len(prompts)))
        batch = self.new_batch(rows, max((self.row_length(p, max_tokens) for p in prompts), default=1))
        outputs = {}  # request -> (prompt index, results, masks)
        for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
            request = batch.add(prompt, num_samples, max_tokens, temperature, top_k, seed)
            outputs[request] = (index, [list(prompt) for _ in range(num_samples)], [[0] * len(prompt) for _ in range(num_samples)])
        while batch.rows or batch.waiting:
            for request, column, column_masks in batch.step():
                index, results, masks = outputs[request]
                for sample, (token, mask) in enumerate(zip(column, column_masks)):
                    if token is not None and token not in self.stop_tokens:  # terminal tokens are not appended
                        results[sample].append(token)
                        masks[sample].append(mask)
                if request.done:
                    yield index, results, masks

    def generate_batch(self, tokens, num_samples=1, seed=42, **kwargs):
        """Non-streaming: returns (results, masks), lists of token lists including the prompt; terminal tokens
        (<|assistant_end|>, BOS) are not appended."""
        _, results, masks = next(self.generate_many([tokens], num_samples, seeds=[seed], max_rows=num_samples, **kwargs))
        return results, masks


# -----------------------------------------------------------------------------------------------------
# Prompts whose greedy completions show at a glance what a base model knows (base_train's samples, base_eval)

SAMPLE_PROMPTS = [
    "The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is", "The planets of the solar system are:", "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]

# -----------------------------------------------------------------------------------------------------
# self-test: naive model.generate vs the engine, greedy, must match token for token

def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare naive generation with the KV-cache engine on a base model")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: largest)")
    parser.add_argument("--step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: last)")
    parser.add_argument("--max-tokens", type=int_in("[1, inf)"), default=64, help="tokens to generate")
    args = parser.parse_args(argv)
    device = torch.device(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model("base", device, "eval", args.model_tag, args.step)
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("The chemical formula of water is")
    naive = list(model.generate(prompt, args.max_tokens, temperature=0.0))
    cached = Engine(model, tokenizer).generate_batch(prompt, max_tokens=args.max_tokens, temperature=0.0)[0][0][len(prompt):]
    print(f"naive : {tokenizer.decode(prompt + naive)!r}")
    print(f"engine: {tokenizer.decode(prompt + cached)!r}")
    # the engine stops at <|assistant_end|>/BOS; compare over the common length
    mismatch = next((i for i, (a, b) in enumerate(zip(naive, cached)) if a != b), None)
    if mismatch is not None:
        raise NanochatError(f"mismatch at generated token {mismatch}: naive {naive[mismatch]} vs engine {cached[mismatch]}")
    print(f"Match: the engine reproduces naive greedy generation ({min(len(naive), len(cached))} tokens)")

if __name__ == "__main__":
    run(main)
