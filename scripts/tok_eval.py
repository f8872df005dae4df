"""
Evaluate the trained tokenizer's compression (bytes per token) on a few kinds of text, compared with the
GPT-2 and GPT-4 tokenizers when tiktoken can load them (it downloads them once; offline we say so and show ours).

    python -m scripts.tok_eval
"""

import os

from nanochat.common import print0, is_offline
from nanochat.dataset import get_dataset_name, get_split_files, open_parquet, read_row_group_texts
from nanochat.tokenizer import get_tokenizer, RustBPETokenizer

# -----------------------------------------------------------------------------
# Sample texts (our own), one per kind of content

news_text = r"""
The city council voted on Tuesday to expand the public library's weekend hours, a change residents had requested
for years. "People work during the week — Saturday is when families can actually come in," said the head librarian,
who has run the downtown branch since 2011. The new schedule takes effect on March 3rd and will cost roughly
$240,000 a year, funded by a reallocation from the road-maintenance budget.

Council members also approved a pilot program that lends laptops and Wi-Fi hotspots to students who lack internet
access at home. The program begins with 150 devices; if demand exceeds supply, a waiting list will be kept at each
branch. Critics argued the money could be better spent on repairing older buildings, but the measure passed 7–2.
""".strip()

korean_text = r"""
우리 도서관은 지역 주민 누구나 무료로 이용할 수 있는 열린 공간입니다. 매주 토요일에는 어린이를 위한 책 읽기 모임이 열리고,
평일 저녁에는 성인을 위한 글쓰기 강좌가 진행됩니다. 도서관은 지역 사회와 함께 성장하는 것을 목표로 하며,
주민 여러분의 의견을 항상 환영합니다.
""".strip()

code_text = r"""
class WordCounter:
    \"\"\"Counts how often each word appears in a stream of lines.\"\"\"

    def __init__(self, lowercase=True):
        self.lowercase = lowercase
        self.counts = {}

    def add_line(self, line):
        for word in line.split():
            word = word.strip(".,;:!?\"'()[]")
            if self.lowercase:
                word = word.lower()
            if word:
                self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k=10):
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

if __name__ == "__main__":
    counter = WordCounter()
    for line in open("book.txt", encoding="utf-8"):
        counter.add_line(line)
    for word, n in counter.most_common(5):
        print(f"{word:>12} {n:6d}")
""".strip()

math_text = r"""
\documentclass{article}
\usepackage{amsmath}
\begin{document}
\section*{The sum of the first $n$ odd numbers}
\textbf{Claim.} For every integer $n \ge 1$, $\sum_{k=1}^{n} (2k-1) = n^2$.

\textbf{Proof by induction.} For $n = 1$ the sum is $1 = 1^2$. Assume $\sum_{k=1}^{n} (2k-1) = n^2$. Then
\begin{align*}
\sum_{k=1}^{n+1} (2k-1) &= n^2 + (2(n+1) - 1) \\
                       &= n^2 + 2n + 1 = (n+1)^2.
\end{align*}
Hence the claim holds for all $n$. \qed

\textbf{Picture.} Arrange $n^2$ dots in a square; each new odd number $2n+1$ is the L-shaped border that
turns an $n \times n$ square into an $(n+1) \times (n+1)$ square.
\end{document}
""".strip()

science_text = r"""
Mitochondria generate most of a cell's supply of adenosine triphosphate (ATP) through oxidative phosphorylation.
Electrons derived from NADH and FADH2 pass along the electron transport chain in the inner mitochondrial membrane,
and the energy released pumps protons into the intermembrane space. The resulting electrochemical gradient drives
ATP synthase, a rotary enzyme that phosphorylates ADP. Uncoupling proteins let protons leak back without producing
ATP, releasing the energy as heat, which is how brown adipose tissue keeps hibernating mammals warm.
""".strip()

all_text = [("news", news_text), ("korean", korean_text), ("code", code_text), ("math", math_text), ("science", science_text)]

# two samples from the pretraining data itself: the first row group of the first train shard and of the val shard
dataset = get_dataset_name()
for split in ("train", "val"):
    path = get_split_files(split)[0]
    texts = read_row_group_texts(open_parquet(path), 0, path)
    sample = "\n".join(texts)
    if sample:
        all_text.append((f"{dataset}-{split}", sample))

# -----------------------------------------------------------------------------
# Tokenizers

tokenizers = {"ours": get_tokenizer()}  # first: a missing tokenizer is the likelier error
skipped = []
offline = is_offline()
for name, tiktoken_name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
    try:
        if offline:
            raise RuntimeError("NANOCHAT_OFFLINE is set")
        tokenizers[name] = RustBPETokenizer.from_pretrained(tiktoken_name)
    except Exception:  # tiktoken downloads these on first use; offline it cannot
        skipped.append(name)
if skipped:
    print0(f"Note: comparison with {' and '.join(s.upper().replace('GPT', 'GPT-') for s in skipped)} skipped "
           f"(tiktoken could not load their encodings, probably offline); showing our tokenizer's own ratios.")

print0("Vocab sizes:")
for name, tok in sorted(tokenizers.items(), key=lambda kv: kv[0] == "ours"):
    print0(f"{name.upper()}: {tok.get_vocab_size()}")

results = {}
for name, tok in tokenizers.items():
    results[name] = {}
    for text_name, text in all_text:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{name} does not round-trip the {text_name} text"
        num_bytes = len(text.encode("utf-8"))
        results[name][text_name] = {"bytes": num_bytes, "tokens": len(ids), "ratio": num_bytes / len(ids)}

GREEN, RED, RESET = "\033[92m", "\033[91m", "\033[0m"

def print_comparison(baseline, label):
    print0(f"\nComparison with {label}:")
    print0("=" * 95)
    print0(f"{'Text Type':<15} {'Bytes':<8} {label + ' Tokens':<14} {label + ' Ratio':<13} {'Ours Tokens':<12} {'Ours Ratio':<11} {'Relative Diff %':<16} {'Better':<8}")
    print0("-" * 95)
    for text_name, _ in all_text:
        b, o = results[baseline][text_name], results["ours"][text_name]
        diff = (b["tokens"] - o["tokens"]) / b["tokens"] * 100  # positive: we use fewer tokens
        better = "Ours" if o["ratio"] > b["ratio"] else label if b["ratio"] > o["ratio"] else "Tie"
        bc, oc = (RED, GREEN) if better == "Ours" else (GREEN, RED) if better == label else ("", "")
        print0(f"{text_name:<15} {b['bytes']:<8} {bc}{b['tokens']:<14}{RESET} {bc}{b['ratio']:<13.2f}{RESET} "
               f"{oc}{o['tokens']:<12}{RESET} {oc}{o['ratio']:<11.2f}{RESET} {diff:+.1f}%{'':<10} {better:<8}")

def markdown_comparison(baseline, label):
    lines = [f"### Comparison with {label}", "",
             f"| Text Type | Bytes | {label} Tokens | {label} Ratio | Ours Tokens | Ours Ratio | Relative Diff % |",
             "|-----------|-------|" + "-" * (len(label) + 9) + "|" + "-" * (len(label) + 8) + "|-------------|------------|-----------------|"]
    for text_name, _ in all_text:
        b, o = results[baseline][text_name], results["ours"][text_name]
        diff = (b["tokens"] - o["tokens"]) / b["tokens"] * 100
        lines.append(f"| {text_name} | {b['bytes']} | {b['tokens']} | {b['ratio']:.2f} | {o['tokens']} | {o['ratio']:.2f} | {diff:+.1f}% |")
    return "\n".join(lines) + "\n\n"

report_parts = []
for baseline, label in (("gpt2", "GPT-2"), ("gpt4", "GPT-4")):
    if baseline in results:
        print_comparison(baseline, label)
        report_parts.append(markdown_comparison(baseline, label))

if skipped:  # our own ratios, alone
    print0("\nOur tokenizer:")
    print0("=" * 50)
    print0(f"{'Text Type':<15} {'Bytes':<10} {'Tokens':<10} {'Ratio':<8}")
    print0("-" * 50)
    lines = ["### Our tokenizer", "", f"Comparison with {', '.join(skipped)} skipped (encodings unavailable offline).", "",
             "| Text Type | Bytes | Ours Tokens | Ours Ratio |", "|-----------|-------|-------------|------------|"]
    for text_name, _ in all_text:
        o = results["ours"][text_name]
        print0(f"{text_name:<15} {o['bytes']:<10} {o['tokens']:<10} {o['ratio']:<8.2f}")
        lines.append(f"| {text_name} | {o['bytes']} | {o['tokens']} | {o['ratio']:.2f} |")
    report_parts.append("\n".join(lines) + "\n\n")

try:
    from nanochat.report import get_report
except ImportError:  # the report module is optional
    get_report = None
if get_report is not None:
    get_report().log(section="Tokenizer evaluation", data=report_parts)
