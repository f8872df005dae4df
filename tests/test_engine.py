"""
The inference engine (spec data_eval_report.md 6, 7.3, 9.1): KV cache bookkeeping, sampling, seeds, batching,
the calculator tool state machine with a scripted fake model, and a tiny real GPT whose cached generation must
equal naive uncached greedy generation.
"""

import itertools
import threading
from dataclasses import dataclass

import pytest
import torch

from nanochat import flash_attention as fa
from nanochat.errors import NanochatError
from nanochat.engine import Engine, KVCache, sample_next_token, use_calculator
from conftest import make_tiny_model


pytestmark = [pytest.mark.usefixtures("single_thread"),  # conftest.py: tiny tensors run faster on one thread
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]
CPU_BACKENDS = ["sdpa", "flex"]  # the attention backends that run on CPU (flex eagerly)

# -------------------------------------------------------------------------------------------------
# mocks (spec 9.1): byte-level tokenizer with 6 specials, a model returning uniform logits

SPECIALS = {"<|python_start|>": 256, "<|python_end|>": 257, "<|output_start|>": 258, "<|output_end|>": 259,
            "<|assistant_end|>": 260, "<|bos|>": 261}
VOCAB = 262


class ByteTokenizer:
    def encode_special(self, name):
        return SPECIALS[name]

    def get_bos_token_id(self):
        return SPECIALS["<|bos|>"]

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class MockConfig:
    n_kv_head: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_layer: int = 2
    sequence_len: int = 128


class UniformModel:
    """Returns all-zero logits and advances the cache, like a real model would."""

    def __init__(self):
        self.config = MockConfig()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        if kv_cache is not None:
            kv_cache.advance(T)
        return torch.zeros(B, T, VOCAB)


class ScriptedModel(UniformModel):
    """Puts (almost) all probability on script[i] for the i-th generated position, so what the engine does
    with each token (tool calls, forcing, stopping) is fully determined."""

    def __init__(self, script, prompt_len):
        super().__init__()
        self.script, self.prompt_len = script, prompt_len

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        starts = list(kv_cache.lengths) if kv_cache is not None else [0] * B
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = torch.full((B, T, VOCAB), -100.0)
        for b, t in itertools.product(range(B), range(T)):
            gen_index = starts[b] + t + 1 - self.prompt_len  # index of the token these logits predict
            if 0 <= gen_index < len(self.script):
                logits[b, t, self.script[gen_index]] = 100.0
        return logits


# -------------------------------------------------------------------------------------------------
# KV cache

def test_kv_cache_bookkeeping():
    cache = KVCache(batch_size=2, num_heads=4, seq_len=32, head_dim=8, num_layers=3, device="cpu")
    assert cache.lengths == [0, 0]
    assert cache.k_cache.shape == cache.v_cache.shape == (3, 2, 32, 4, 8)
    cache.advance(10)
    cache.advance(5)
    assert cache.lengths == [15, 15] and cache.cache_seqlens.tolist() == [15, 15]
    k, v = cache.get_layer_cache(1)
    assert k.shape == v.shape == (2, 32, 4, 8)
    with pytest.raises(ValueError, match="overflow"):
        cache.advance(33)


def test_kv_cache_rows_join_and_leave():
    """Prefilled prompts join as rows at their own lengths; a freed row is taken by the last one, so the rows in use
    stay the first ones and the model sees only them."""
    def prefilled(length, fill):
        src = KVCache(batch_size=1, num_heads=4, seq_len=length, head_dim=8, num_layers=2, device="cpu")
        src.k_cache.fill_(fill)
        src.v_cache.fill_(-fill)
        src.advance(length)
        src.prev_embedding = torch.full((1, 1, 64), float(fill))
        return src
    dst = KVCache(batch_size=4, num_heads=4, seq_len=64, head_dim=8, num_layers=2, device="cpu")
    dst.truncate(0)
    dst.append_rows(prefilled(16, 1.0), 2)
    dst.append_rows(prefilled(5, 2.0), 1)
    assert dst.lengths == [16, 16, 5] and dst.cache_seqlens.tolist() == [16, 16, 5]
    assert dst.get_layer_cache(0)[0].shape == (3, 64, 4, 8) and dst.prev_embedding[:, 0, 0].tolist() == [1, 1, 2]
    assert (dst.k_cache[:, :2, :16] == 1).all() and (dst.v_cache[:, 2, :5] == -2).all()
    assert torch.count_nonzero(dst.k_cache[:, 2, 5:]) == 0
    dst.advance(1)
    assert dst.lengths == [17, 17, 6]
    dst.remove_row(0)  # the 6-token row moves into row 0
    assert dst.lengths == [6, 17] and dst.cache_seqlens.tolist() == [6, 17]
    assert (dst.k_cache[:, 0, :5] == 2).all() and dst.prev_embedding[:, 0, 0].tolist() == [2, 1]
    dst.remove_row(1)
    assert dst.lengths == [6] and dst.get_layer_cache(1)[1].shape == (1, 64, 4, 8)


# -------------------------------------------------------------------------------------------------
# sampling and batching (spec 9.1)

def test_sample_next_token():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    rng = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, rng, temperature=0.0).tolist() == [[1], [0]]  # argmax, first of ties
    for _ in range(20):
        ids = sample_next_token(logits, rng, temperature=1.0, top_k=2)
        assert ids[0, 0].item() in (1, 3) and ids[1, 0].item() in (0, 1, 2, 3)
    assert sample_next_token(logits, rng, temperature=1.0, top_k=100).shape == (2, 1)  # k clipped to V
    with pytest.raises(AssertionError):
        sample_next_token(logits, rng, temperature=-1.0)


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-39, 1e-45, 1e-46, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k", [None, 2])
def test_sample_next_token_near_zero_temperature(temperature, top_k):
    """Every temperature > 0 samples: near 0 it picks the best token (one of the tied best), never a NaN error."""
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [3.0, 0.0, 0.0, 0.0], [-2.0, -1.0, -1.5, -3.0]])
    rng = torch.Generator().manual_seed(0)
    for _ in range(10):
        ids = sample_next_token(logits, rng, temperature=temperature, top_k=top_k)[:, 0].tolist()
        assert ids[0] in (1, 3) and ids[1:] == [0, 1]


def test_samples_are_independent_after_prefill():
    engine = Engine(UniformModel(), ByteTokenizer())
    first_column, _ = next(engine.generate([261, 72, 105], num_samples=16, max_tokens=4, temperature=1.0))
    assert len(set(first_column)) > 1


@pytest.mark.parametrize("seed", [1, 42, 123, 999])
def test_same_seed_same_output(seed):
    engine = Engine(UniformModel(), ByteTokenizer())
    a = engine.generate_batch([261, 72, 105], num_samples=4, max_tokens=16, temperature=1.0, seed=seed)
    b = engine.generate_batch([261, 72, 105], num_samples=4, max_tokens=16, temperature=1.0, seed=seed)
    assert a == b


def test_temperature_zero_ignores_seed_and_seeds_differ():
    engine = Engine(UniformModel(), ByteTokenizer())
    outs = {str(engine.generate_batch([261, 65], max_tokens=8, temperature=0.0, seed=s)[0]) for s in range(5)}
    assert len(outs) == 1
    outs = {str(engine.generate_batch([261, 65], max_tokens=8, temperature=1.0, seed=s)[0]) for s in range(10)}
    assert len(outs) >= 2


@pytest.mark.parametrize("max_tokens", [1, 4, 16, 64])
def test_max_tokens_respected(max_tokens):
    engine = Engine(UniformModel(), ByteTokenizer())
    prompt = [261, 72, 105]
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=max_tokens, temperature=1.0)
    for r, m in zip(results, masks):
        assert len(r) - len(prompt) <= max_tokens and len(r) == len(m)


@pytest.mark.parametrize("num_samples", [1, 4, 16, 64])
def test_num_samples(num_samples):
    engine = Engine(UniformModel(), ByteTokenizer())
    results, masks = engine.generate_batch([261, 65], num_samples=num_samples, max_tokens=3)
    assert len(results) == len(masks) == num_samples


def test_generation_stops_when_context_is_full():
    model = UniformModel()
    model.config.sequence_len = 20
    engine = Engine(model, ByteTokenizer())
    prompt = [261] + [65] * 9
    columns = list(engine.generate(prompt, max_tokens=None, temperature=0.0))  # argmax of zeros = byte 0, never ends
    assert len(columns) == 20 - len(prompt) + 1  # last token is emitted, then the full cache stops the loop


# -------------------------------------------------------------------------------------------------
# tool use with a scripted model

def test_calculator_tool_call_is_forced_into_the_stream():
    tok = ByteTokenizer()
    prompt = [261] + tok.encode("Q")
    expr = tok.encode("12*3+1,000")
    forced = [258] + tok.encode("1036") + [259]
    filler = [ord("x")] * len(forced)  # sampled while forcing: must be discarded
    script = tok.encode("A:") + [256] + expr + [257] + filler + tok.encode("ok") + [260]
    engine = Engine(ScriptedModel(script, len(prompt)), tok)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=64, temperature=1.0)
    expected = prompt + tok.encode("A:") + [256] + expr + [257] + forced + tok.encode("ok")
    for r, m in zip(results, masks):
        assert r == expected  # the terminal <|assistant_end|> is not appended
        gen_masks = m[len(prompt):]
        start = len(tok.encode("A:")) + 1 + len(expr) + 1
        assert gen_masks[:start] == [1] * start
        assert gen_masks[start:start + len(forced)] == [0] * len(forced)
        assert gen_masks[start + len(forced):] == [1, 1]
        assert m[:len(prompt)] == [0] * len(prompt)


def test_invalid_tool_call_forces_nothing_and_streams_masks():
    tok = ByteTokenizer()
    prompt = [261]
    script = [256] + tok.encode("__import__('os')") + [257] + tok.encode("y") + [260] + tok.encode("zz")
    engine = Engine(ScriptedModel(script, len(prompt)), tok)
    columns = list(engine.generate(prompt, num_samples=1, max_tokens=64, temperature=0.0))
    tokens = [c[0][0] for c in columns]
    assert 258 not in tokens and tokens[-1] == 260  # stops after <|assistant_end|>
    assert all(c[1] == [1] for c in columns)


def test_calculator():
    assert use_calculator("1+2") == 3
    assert use_calculator("1,000 * 3") == 3000
    assert use_calculator("(10 - 4) / 4") == 1.5
    assert use_calculator("-3 + +2") == -1
    assert use_calculator("2**10") is None           # no exponentiation
    assert use_calculator("1/0") is None
    assert use_calculator("3 +") is None
    assert use_calculator("") is None
    assert use_calculator("9" * 40 + "*" + "9" * 40) is None  # result too large
    assert use_calculator("'strawberry'.count('r')") == 3
    assert use_calculator('"Banana".lower().count("a")') == 3
    assert use_calculator('"a,b,c".count(",")') == 2  # commas inside string literals survive
    for evil in ("__import__('os').system('ls')", "open('x').read()", "'a'.__class__", "print('hi')",
                 "'abc'.count('a') + exec('1')", "(lambda: 1)()", "'x'.join('ab').count('x')", "x.count('a')"):
        assert use_calculator(evil) is None, evil


def test_calculator_works_from_any_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(use_calculator("6*7")))
    thread.start()
    thread.join(timeout=10)
    assert results == [42]  # a signal-based timeout would make this None outside the main thread


# -------------------------------------------------------------------------------------------------
# a tiny real GPT: cached generation == naive uncached greedy generation

def tiny_gpt(vocab=VOCAB, T=64, n_kv_head=2, pattern="SL"):
    model = make_tiny_model(vocab, n_layer=3, n_embd=64, n_head=4, n_kv_head=n_kv_head, sequence_len=T,
                            window_pattern=pattern)
    with torch.no_grad():  # make logits well separated so argmax is decisive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(30)
    model.eval()
    return model


@pytest.mark.parametrize("pattern,n_kv_head", [("SL", 2), ("L", 4)])
def test_engine_matches_naive_greedy(pattern, n_kv_head):
    model = tiny_gpt(n_kv_head=n_kv_head, pattern=pattern)
    tok = ByteTokenizer()
    prompt = [261] + tok.encode("hello there")  # 12 tokens, generation runs past the 16-token short window
    naive = list(model.generate(prompt, max_tokens=30, temperature=0.0))
    engine = Engine(model, tok)
    columns = list(engine.generate(prompt, num_samples=3, max_tokens=30, temperature=0.0))
    cached = [c[0] for c in columns]
    # the engine stops early only on <|assistant_end|>/BOS; compare over what it produced
    assert len(cached) > 0
    for row in range(3):
        assert [col[row] for col in cached] == naive[:len(cached)]


@pytest.fixture
def backend(request):
    fa.set_backend_override(request.param)
    yield request.param
    fa.set_backend_override(None)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@torch.inference_mode()
def test_model_decodes_rows_at_different_positions(backend):
    """Prompts of different lengths prefilled one by one into rows of one cache, then decoded together (per-row
    rotary offsets, smear state and attention masks, past the 16-token sliding window): every row's logits equal
    those of one full forward over its own sequence."""
    model = tiny_gpt(T=64, pattern="SL")
    torch.manual_seed(0)
    sequences = [torch.randint(0, 256, (n,)) for n in (30, 9, 21)]
    decode = 8
    cache = Engine(model, ByteTokenizer()).new_cache(3, 64)
    cache.truncate(0)
    for seq in sequences:
        prefill = KVCache(1, num_heads=2, seq_len=len(seq) - decode, head_dim=16, num_layers=3, device="cpu")
        model.forward(seq[None, :-decode], kv_cache=prefill)
        cache.append_rows(prefill, 1)
    full = [model.forward(seq[None])[0] for seq in sequences]
    for t in range(decode):
        ids = torch.stack([seq[len(seq) - decode + t] for seq in sequences])[:, None]
        logits = model.forward(ids, kv_cache=cache)
        for row, seq in enumerate(sequences):
            torch.testing.assert_close(logits[row, 0], full[row][len(seq) - decode + t], atol=1e-4, rtol=1e-4)
    assert cache.lengths == [30, 9, 21]


class ToolOverlay:
    """A real tiny GPT whose next token is overridden after a few tokens. The override is a function of each row's
    own last token, so batching cannot change it: "=" starts the calculator call 6*7, the calculator's answer ends
    the turn, and "!" ends it at once."""

    def __init__(self, model):
        self.model, self.config = model, model.config
        script = {ord("="): 256, 256: ord("6"), ord("6"): ord("*"), ord("*"): ord("7"), ord("7"): 257, 259: 260, ord("!"): 260}
        self.table = torch.full((VOCAB,), -1)
        for token, forced in script.items():
            self.table[token] = forced

    def get_device(self):
        return self.model.get_device()

    def forward(self, ids, kv_cache=None):
        logits = self.model.forward(ids, kv_cache=kv_cache)
        target = self.table[ids]
        hit = target >= 0
        logits[hit] = -100.0
        rows, positions = hit.nonzero(as_tuple=True)
        logits[rows, positions, target[hit]] = 100.0
        return logits


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_batched_greedy_equals_one_prompt_greedy(backend):
    """Prompts of different lengths decoded together, 5 rows for 6 prompts x 2 samples (prompts join as others end):
    every row's greedy tokens and masks equal those of the prompt generated alone, including a row that calls the
    calculator and rows that end early."""
    tok = ByteTokenizer()
    engine = Engine(ToolOverlay(tiny_gpt()), tok)
    texts = ["hello there", "a", "what is six times seven =", "the quick brown fox jumps over!", "xyz",
             "a longer prompt about rows and positions"]
    prompts = [[261] + tok.encode(text) for text in texts]
    alone = [engine.generate_batch(p, num_samples=2, max_tokens=24, temperature=0.0) for p in prompts]
    together = {}
    for index, results, masks in engine.generate_many(prompts, num_samples=2, max_tokens=24, temperature=0.0, max_rows=5):
        together[index] = (results, masks)
    assert list(together) != sorted(together)  # results come as prompts end: the early ones first
    for index, prompt in enumerate(prompts):
        assert together[index] == alone[index], texts[index]
    # the calculator row: 6*7 written, 42 forced (mask 0), then the turn ends; "!" ends the turn at once
    calculator = [256, ord("6"), ord("*"), ord("7"), 257, 258, ord("4"), ord("2"), 259]
    assert together[2] == ([prompts[2] + calculator] * 2, [[0] * len(prompts[2]) + [1] * 5 + [0] * 4] * 2)
    assert together[3][0] == [prompts[3]] * 2


def test_sampled_request_does_not_depend_on_the_rest_of_the_batch():
    """Each request samples its rows with its own seeded generator: the same tokens alone or among others."""
    tok = ByteTokenizer()
    engine = Engine(tiny_gpt(), tok)
    prompts = [[261] + tok.encode(text) for text in ("one", "two two", "three three three", "4")]
    seeds = [5, 6, 7, 8]
    kwargs = dict(num_samples=2, max_tokens=12, temperature=1.0, top_k=20)
    alone = [engine.generate_batch(p, seed=seed, **kwargs) for p, seed in zip(prompts, seeds)]
    together = {i: (r, m) for i, r, m in engine.generate_many(prompts, seeds=seeds, max_rows=6, **kwargs)}
    assert [together[i] for i in range(4)] == alone
    assert len({str(r[0]) for r in alone}) == 4


def test_ended_or_cancelled_rows_are_taken_at_the_next_step():
    engine = Engine(UniformModel(), ByteTokenizer())  # greedy: byte 0 forever, never a stop token
    batch = engine.new_batch(max_rows=2, seq_len=32)
    short = batch.add([261, 65], max_tokens=2, temperature=0.0)
    long = batch.add([261, 66, 67], max_tokens=20, temperature=0.0)
    queued = batch.add([261, 68], max_tokens=20, temperature=0.0)
    last = batch.add([261, 69], max_tokens=20, temperature=0.0)
    assert [request for request, _, _ in batch.step()] == [short, long]
    assert [request for request, _, _ in batch.step()] == [short, long] and short.done
    assert [request for request, _, _ in batch.step()] == [long, queued]  # took the freed row at once
    assert batch.cache.lengths == [5, 2]
    batch.cancel(long)
    assert long.done and len(batch.rows) == 1
    assert {request for request, _, _ in batch.step()} == {queued, last}
    batch.cancel(queued)
    batch.cancel(last)
    assert batch.step() == [] and not batch.rows and not batch.waiting
    with pytest.raises(ValueError, match="do not fit"):
        batch.add([261] * 40)


def test_engine_sampling_on_real_model_is_seeded():
    model = tiny_gpt()
    engine = Engine(model, ByteTokenizer())
    a = engine.generate_batch([261, 72], num_samples=2, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    b = engine.generate_batch([261, 72], num_samples=2, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    assert a == b


def test_module_self_test_on_a_saved_checkpoint(base_dir, tiny_tokenizer, monkeypatch, capsys):
    """`python -m nanochat.engine`: loads the latest base checkpoint and checks engine == naive generation."""
    import dataclasses
    from nanochat import engine as engine_module
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.tokenizer import get_tokenizer_dir
    tiny_tokenizer.save(get_tokenizer_dir())
    model = tiny_gpt(vocab=tiny_tokenizer.get_vocab_size())
    save_checkpoint(str(base_dir / "base_checkpoints" / "d3"), 7, model.state_dict(), None,
                    {"step": 7, "model_config": dataclasses.asdict(model.config)})
    engine_module.main(["--device-type", "cpu", "--max-tokens", "20"])
    out = capsys.readouterr().out
    assert "Match: the engine reproduces naive greedy generation (20 tokens)" in out
    # an engine that strays from naive generation is a typed error naming the first differing token
    generate_batch = Engine.generate_batch
    def off_by_one(self, tokens, **kwargs):
        results, masks = generate_batch(self, tokens, **kwargs)
        first = len(tokens)  # the first generated token, changed to another byte
        results[0][first] = (results[0][first] + 1) % 256
        return results, masks
    monkeypatch.setattr(Engine, "generate_batch", off_by_one)
    with pytest.raises(NanochatError, match="^mismatch at generated token 0: naive "):
        engine_module.main(["--device-type", "cpu", "--max-tokens", "20"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir / "empty"))
    from nanochat.checkpoint_manager import CheckpointError
    with pytest.raises(CheckpointError, match="^no base checkpoint found"):
        engine_module.main(["--device-type", "cpu"])
