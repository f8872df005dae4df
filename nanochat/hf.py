"""
Hugging Face interop (optional dependency group: pip install -e .[hf]).

- export_hf: write a nanochat checkpoint as a directory transformers loads with
  AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True) and AutoTokenizer.from_pretrained(dir).
- load_hf_model: any transformers causal LM + tokenizer behind the interface CORE, bits per byte and the samples of
  base_eval use for our own GPT (model(idx) -> logits, model(x, y, loss_reduction) -> loss, tokenizer.encode(...)).
"""

import os
import shutil
from itertools import takewhile

import torch
import torch.nn.functional as F

from nanochat.common import is_offline
from nanochat.errors import NanochatError
from nanochat.gpt import compute_window_sizes, has_value_embedding
from nanochat.tokenizer import SPECIAL_TOKENS

try:  # optional: without them this module still imports, and export_hf / load_hf_model say what to install
    import tokenizers
    import transformers
    from safetensors.torch import save_file

    from nanochat.hf_modeling import NanochatConfig
except ImportError:
    transformers = None

MODELING_FILE = os.path.join(os.path.dirname(__file__), "hf_modeling.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# render_conversation for plain-text user/assistant turns (a system message is folded into the first user turn).
# Tool-call parts (python / python_output) are not expressible in message strings, so the template leaves them out.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(prefix='') -%}{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.prefix = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}{{- '<|user_start|>' + ns.prefix + m['content'] + '<|user_end|>' -}}"
    "{%- set ns.prefix = '' -%}"
    "{%- else -%}{{- '<|assistant_start|>' + m['content'] + '<|assistant_end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def require_hf():
    if transformers is None:
        raise NanochatError("Hugging Face interop needs the optional dependencies: pip install -e .[hf]")


# -----------------------------------------------------------------------------
# Export


def byte_to_unicode():
    """The byte-level BPE alphabet: each byte as one printable character (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def split_merge(token, ranks):
    """The pair that BPE merged last into `token`: replay BPE on its bytes with the merges ranked below it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, len(ranks)) for a, b in zip(parts, parts[1:])]
        i = pair_ranks.index(min(pair_ranks))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def export_tokenizer(tokenizer, out_dir):
    enc = tokenizer.enc
    ranks = enc._mergeable_ranks  # tiktoken has no public accessor for its ranks and split pattern
    chars = byte_to_unicode()
    to_str = lambda b: "".join(chars[x] for x in b)
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = [tuple(map(to_str, split_merge(token, ranks))) for token in sorted(ranks, key=ranks.get) if len(token) > 1]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(enc._pat_str), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    # every document our models saw began with <|bos|>: tokenizer(text) and pipelines add it (add_special_tokens=False
    # leaves it out); the chat template writes its own and is tokenized without it, so it is never doubled
    bos = "<|bos|>"
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.get_bos_token_id())])
    # padding goes on the left, where a batch being generated needs it (the model reads attention_mask)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|assistant_end|>",
                                                chat_template=CHAT_TEMPLATE, padding_side="left")
    fast.save_pretrained(out_dir)


def export_hf(model, tokenizer, out_dir, dtype="float32"):
    """Write model.safetensors, config.json, the modeling file and the tokenizer files into out_dir."""
    require_hf()
    c = model.config
    config = NanochatConfig(
        vocab_size=c.vocab_size, padded_vocab_size=model.padded_vocab_size, n_layer=c.n_layer, n_head=c.n_head,
        n_kv_head=c.n_kv_head, n_embd=c.n_embd, sequence_len=c.sequence_len,
        window_sizes=[left for left, _ in compute_window_sizes(c)],
        value_embed_layers=[i for i in range(c.n_layer) if has_value_embedding(i, c.n_layer)],
        max_position_embeddings=model.cos.size(1),  # as far as our rotary table reaches
        bos_token_id=tokenizer.get_bos_token_id(), eos_token_id=tokenizer.encode_special("<|assistant_end|>"),
        architectures=["NanochatForCausalLM"], dtype=dtype,
        auto_map={"AutoConfig": "hf_modeling.NanochatConfig", "AutoModelForCausalLM": "hf_modeling.NanochatForCausalLM"},
    )
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    state = {k: v.detach().to(DTYPES[dtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(MODELING_FILE, os.path.join(out_dir, "hf_modeling.py"))
    export_tokenizer(tokenizer, out_dir)


# -----------------------------------------------------------------------------
# Loading any causal LM for base_eval


class HFModel:
    """A transformers causal LM called the way our GPT is. max_seq_len makes CORE crop few-shot prompts to it."""

    def __init__(self, model):
        self.model = model
        self.max_seq_len = model.config.max_position_embeddings
        # bits per byte runs at the training context when the config knows it (our exports), else the full window
        self.sequence_len = min(getattr(model.config, "sequence_len", self.max_seq_len), self.max_seq_len)

    def get_device(self):
        return self.model.device

    @torch.no_grad()
    def __call__(self, idx, targets=None, loss_reduction="mean"):
        logits = self.model(input_ids=idx, use_cache=False).logits.float()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)


class HFTokenizer:
    """A transformers tokenizer with our tokenizer's methods. BOS falls back to EOS (GPT-2's <|endoftext|>)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=None):
        """str -> ids, list[str] -> list of ids; prepend: a token id to put first (BOS)."""
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def token_bytes(self, device="cpu"):
        """Bytes per token id for bits per byte; special tokens count 0 (as compute_token_bytes does)."""
        to_byte = {ch: b for b, ch in byte_to_unicode().items()}
        special = set(self.tokenizer.all_special_ids) | {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        counts = []
        for i, token in enumerate(self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))):
            if i in special or token is None:
                counts.append(0)
            elif all(ch in to_byte for ch in token):  # byte-level BPE (GPT-2 style): one char per byte
                counts.append(len(token))
            else:
                counts.append(len(self.tokenizer.convert_tokens_to_string([token]).encode("utf-8")))
        return torch.tensor(counts, dtype=torch.int32, device=device)


class HFEngine:
    """Engine.generate_batch for a transformers model (no tool use): results stop before BOS/EOS."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def generate_batch(self, tokens, num_samples=1, max_tokens=16, temperature=1.0, seed=42):
        torch.manual_seed(seed)
        ids = torch.tensor([tokens] * num_samples, device=self.model.get_device())
        stop = self.tokenizer.get_bos_token_id()
        sampling = dict(do_sample=True, temperature=temperature, top_k=None) if temperature > 0 else dict(do_sample=False)
        out = self.model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                        eos_token_id=stop, pad_token_id=stop, **sampling)
        return [tokens + list(takewhile(lambda t: t != stop, row[len(tokens):])) for row in out.tolist()], None


def load_hf_model(path, device):
    """-> (HFModel, HFTokenizer) from a local directory or a hub name; NanochatError when it cannot be loaded."""
    require_hf()
    local = os.path.isdir(path)  # run a model's own code only from a directory the user chose, never from the hub
    if not local and is_offline():
        raise NanochatError(f"--hf-path={path}: no such local directory, and the hub is offline "
                            f"(HF_HUB_OFFLINE/NANOCHAT_OFFLINE); pass a directory written by save_pretrained")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=local, dtype="auto")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise NanochatError(f"--hf-path={path}: could not load it with transformers: {str(e).splitlines()[0]}") from None
    return HFModel(model.to(device).eval()), HFTokenizer(tokenizer)
