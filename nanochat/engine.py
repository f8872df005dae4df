"""
Fast inference: a KV cache, batched sampling, and the calculator tool state machine.

The engine works on token ids. It needs from the model: `config` (n_kv_head, n_head, n_embd, n_layer,
sequence_len), `get_device()`, and `forward(ids, kv_cache=...)` returning (B, T, V) logits while writing and
advancing the cache; from the tokenizer: `encode_special`, `get_bos_token_id`, `encode(str)`, `decode(ids)`.

Generation: the prompt is prefilled once with batch size 1, then that cache is copied into a cache with one row per
sample, and every row samples independently from there. A row that writes <|python_start|> expr <|python_end|>
gets the calculator's answer forced into its stream as <|output_start|> result <|output_end|> (mask 0 = forced).
"""

import ast
import operator
import argparse

import torch
import torch.nn.functional as F

from nanochat.cli import run
from nanochat.common import COMPUTE_DTYPE, autodetect_device_type, int_in
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
    needle = call.args[0]
    bounds = [_eval_arithmetic(a) for a in call.args[1:]]
    if not all(isinstance(b, int) for b in bounds):
        raise ValueError("count bounds must be integers")
    return _eval_string_receiver(call.func.value).count(needle.value, *bounds)


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
    """Per-layer K/V storage (num_layers, B, T_max, H_kv, D), the layout FA3's kv-cache API expects.
    All rows are always at the same position. Also carries the last pre-smear embedding for the model's smear."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype=COMPUTE_DTYPE):
        self.batch_size, self.seq_len, self.n_layers = batch_size, seq_len, num_layers
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.pos = 0                  # python mirror of cache_seqlens (no device sync to read it)
        self.prev_embedding = None    # (B, 1, C), set by the model

    def get_pos(self):
        return self.pos

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        if self.pos + num_tokens > self.seq_len:
            raise ValueError(f"KV cache overflow: {self.pos} + {num_tokens} > {self.seq_len}")
        self.cache_seqlens += num_tokens
        self.pos += num_tokens

    def prefill(self, other):
        """Copy another (typically batch-1) cache's filled positions into this empty cache, broadcasting rows."""
        n = other.get_pos()
        self.k_cache[:, :, :n] = other.k_cache[:, :, :n]
        self.v_cache[:, :, :n] = other.v_cache[:, :, :n]
        self.cache_seqlens.fill_(n)
        self.pos = n
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()


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
# engine

class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        # a row's turn ends at <|assistant_end|>, or at BOS (a new document) for a base model
        self.stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream (token_column, token_masks): one token per sample per step; mask 1 = sampled, 0 = forced."""
        model, tok = self.model, self.tokenizer
        device = model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        python_start, python_end = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>")
        output_start, output_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")

        cfg = model.config
        cache_args = dict(num_heads=cfg.n_kv_head, head_dim=cfg.n_embd // cfg.n_head, num_layers=cfg.n_layer, device=device)
        # prefill the prompt once, batch 1
        prefill_cache = KVCache(batch_size=1, seq_len=len(tokens), **cache_args)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        # each row samples on its own from the same distribution
        logits = model.forward(ids, kv_cache=prefill_cache)[:, -1, :].expand(num_samples, -1)
        # decode cache: one row per sample
        cache_len = len(tokens) + max_tokens if max_tokens is not None else max(cfg.sequence_len, len(tokens) + 1)
        decode_cache = KVCache(batch_size=num_samples, seq_len=cache_len, **cache_args)
        decode_cache.prefill(prefill_cache)
        del prefill_cache

        # per row: tokens to emit instead of sampling (tool output), the expression being written inside
        # <|python_start|> ... <|python_end|> (None outside a block), and whether the row has ended its turn
        forced = [[] for _ in range(num_samples)]
        expression = [None] * num_samples
        completed = [False] * num_samples
        num_generated = 0
        while max_tokens is None or num_generated < max_tokens:
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            token_masks = [0 if forced[i] else 1 for i in range(num_samples)]
            token_column = [forced[i].pop(0) if forced[i] else sampled[i] for i in range(num_samples)]
            for i, token in enumerate(token_column):
                completed[i] = completed[i] or token in self.stop_tokens
                # tool state machine
                if token == python_start:
                    expression[i] = []
                elif token == python_end and expression[i] is not None:
                    result = use_calculator(tok.decode(expression[i])) if expression[i] else None
                    if result is not None:
                        forced[i] += [output_start, *tok.encode(str(result)), output_end]
                    expression[i] = None
                elif expression[i] is not None:
                    expression[i].append(token)
            yield token_column, token_masks
            num_generated += 1
            if all(completed) or decode_cache.get_pos() >= decode_cache.seq_len:
                break  # every row ended its turn, or the cache (context) is full: stop instead of overflowing
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = model.forward(ids, kv_cache=decode_cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (results, masks), lists of token lists including the prompt; terminal tokens
        (<|assistant_end|>, BOS) are not appended."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                completed[i] = completed[i] or token in self.stop_tokens
                if not completed[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


# -----------------------------------------------------------------------------------------------------
# self-test: naive model.generate vs the engine, greedy, must match token for token

def main():
    parser = argparse.ArgumentParser(description="Compare naive generation with the KV-cache engine on a base model")
    parser.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    parser.add_argument("--model-tag", type=str, default=None, help="base checkpoint tag (default: largest)")
    parser.add_argument("--step", type=int_in("[0, inf)"), default=None, help="checkpoint step (default: last)")
    parser.add_argument("--max-tokens", type=int_in("[1, inf)"), default=64, help="tokens to generate")
    args = parser.parse_args()
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
        raise SystemExit(f"error: mismatch at generated token {mismatch}: naive {naive[mismatch]} vs engine {cached[mismatch]}")
    print(f"Match: the engine reproduces naive greedy generation ({min(len(naive), len(cached))} tokens)")

if __name__ == "__main__":
    run(main)
