"""
Evaluate the trained tokenizer's compression (bytes per token) on a few kinds of text, compared with the
GPT-2 and GPT-4 tokenizers when tiktoken can load them (it downloads them once; offline we say so and show ours).

    python -m scripts.tok_eval
"""

import argparse

from nanochat.cli import run
from nanochat.common import print0, is_offline
from nanochat.report import get_report
from nanochat.dataset import get_dataset_name, get_split_files, open_parquet, read_row_group_texts
from nanochat.tokenizer import get_tokenizer, RustBPETokenizer

# -----------------------------------------------------------------------------
# Sample texts (our own), one per kind of content

news_text = r"""
The city council voted on Tuesday to expand the public library's weekend hours, a change residents had requested
for years. "People work during the week — Saturday is when families can actually come in," said the head librarian,
who has run the downtown branch since 2011. The new schedule takes effect on March 3rd and will cost roughly
$240,000 a year, funded by a reallocation from the road-maintenance budget.
""".strip()

korean_text = r"""
우리 도서관은 지역 주민 누구나 무료로 이용할 수 있는 열린 공간입니다. 매주 토요일에는 어린이를 위한 책 읽기 모임이
열리고, 평일 저녁에는 성인을 위한 글쓰기 강좌가 진행됩니다. 주민 여러분의 의견을 항상 환영합니다.
""".strip()

code_text = r"""
def most_common_words(lines, k=10, lowercase=True):
    \"\"\"The k most frequent words in an iterable of lines, ties broken alphabetically.\"\"\"
    counts = {}
    for line in lines:
        for word in line.split():
            word = word.strip(".,;:!?\"'()[]")
            word = word.lower() if lowercase else word
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
""".strip()

math_text = r"""
\textbf{Claim.} For every integer $n \ge 1$, $\sum_{k=1}^{n} (2k-1) = n^2$.
\textbf{Proof.} For $n = 1$ the sum is $1 = 1^2$. If $\sum_{k=1}^{n} (2k-1) = n^2$, then
\begin{align*}
\sum_{k=1}^{n+1} (2k-1) &= n^2 + (2(n+1) - 1) = n^2 + 2n + 1 = (n+1)^2. \qed
\end{align*}
""".strip()

science_text = r"""
Mitochondria generate most of a cell's supply of adenosine triphosphate (ATP) through oxidative phosphorylation.
Electrons derived from NADH and FADH2 pass along the electron transport chain, and the energy released pumps protons
into the intermembrane space; the resulting electrochemical gradient drives ATP synthase, a rotary enzyme.
""".strip()

SAMPLE_TEXTS = [("news", news_text), ("korean", korean_text), ("code", code_text), ("math", math_text), ("science", science_text)]


def main(argv=None):
    argparse.ArgumentParser(description="Compare the tokenizer's compression with GPT-2's and GPT-4's").parse_args(argv)
    all_text = list(SAMPLE_TEXTS)

    # two samples from the pretraining data itself: the first row group of the first train shard and of the val shard
    dataset = get_dataset_name()
    for split in ("train", "val"):
        path = get_split_files(split)[0]
        sample = "\n".join(read_row_group_texts(open_parquet(path), 0, path))
        if sample:
            all_text.append((f"{dataset}-{split}", sample))

    # Tokenizers: ours, and GPT-2 / GPT-4 for comparison when tiktoken can load them (it downloads them once)

    tokenizers = {"ours": get_tokenizer()}  # first: a missing tokenizer is the likelier error
    skipped = []
    for name, tiktoken_name in (("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")):
        try:
            if is_offline():
                raise RuntimeError("NANOCHAT_OFFLINE is set")
            tokenizers[name] = RustBPETokenizer.from_pretrained(tiktoken_name)
        except Exception:  # offline tiktoken cannot fetch the encodings
            skipped.append(name)
    if skipped:
        print0(f"Note: comparison with {' and '.join(skipped)} skipped (tiktoken could not load their encodings, "
               f"probably offline); showing our tokenizer's own ratios.")
    print0("Vocab sizes: " + ", ".join(f"{name}: {tok.get_vocab_size()}" for name, tok in tokenizers.items()))

    # Compression: bytes per token of every tokenizer on every text, one table (console and markdown)

    header = ["Text Type", "Bytes"] + [f"{name} {col}" for name in tokenizers for col in ("Tokens", "Ratio")]
    rows = []
    for text_name, text in all_text:
        num_bytes = len(text.encode("utf-8"))
        row = [text_name, str(num_bytes)]
        for name, tok in tokenizers.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, f"{name} does not round-trip the {text_name} text"
            row += [str(len(ids)), f"{num_bytes / len(ids):.2f}"]
        rows.append(row)

    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        print0("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    markdown = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows) + "\n"
    get_report().log(section="Tokenizer evaluation", data=[markdown])


if __name__ == "__main__":
    run(main)
