"""Encode throughput of our BPE against Hugging Face `tokenizers`, same text and same vocab.

    python bench/tokenizer.py [--vocab-size 8000] [--repeats 3] [--no-write]
    python bench/tokenizer.py --smoke   # a few KB of text, vocab 300: keeps the script working

Training time once each; encode speed the best of --repeats. Writes the '## Tokenizer' section
of docs/BENCHMARKS.md.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tunelab.tokenizer.bpe import BPETokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

DATA = common.SHARED / "general_english"
FILES = ["the-verdict.txt", "wikitext2_test_part_a.txt"]
TITLE = "Tokenizer"


def best_of(repeats: int, fn) -> tuple[float, object]:
    """Fastest wall time of fn() over repeats runs, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few KB of text, no docs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = parser.parse_args(argv)
    sitting = common.Sitting(common.command_line("tokenizer.py", argv), ("tokenizers",))
    if args.smoke:
        args.vocab_size, args.repeats = 300, 1
        words = "the cat sat on a mat while dogs ran over hills and rivers, singing".split()
        text = "\n".join(" ".join(words[i % 7 : i % 7 + 6]) + "." for i in range(300))
    else:
        missing = [name for name in FILES if not (DATA / name).exists()]
        if missing:
            sys.exit(
                f"bench/tokenizer.py: {DATA} lacks {', '.join(missing)}; check out ../shared/data"
            )
        text = "".join((DATA / name).read_text(encoding="utf-8") for name in FILES)
    lines = text.splitlines(keepends=True)
    mb = len(text.encode("utf-8")) / 1e6

    ours_train_s, ours = best_of(1, lambda: BPETokenizer.train(lines, args.vocab_size))
    hf_train = Tokenizer(models.BPE())
    hf_train.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_train.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf_train_s, _ = best_of(1, lambda: hf_train.train_from_iterator(lines, trainer))

    with tempfile.TemporaryDirectory() as tmp:
        path = ours.save(tmp)
        hf = Tokenizer.from_file(str(path))  # the very same vocab and merges as ours

        # Cold: a fresh tokenizer each run, so every distinct word goes through the merge loop;
        # warm: the per-word cache already holds the whole text's words (GPT-2's steady state).
        fresh = [BPETokenizer.load(path) for _ in range(args.repeats)]
        cold_s, ids = best_of(args.repeats, lambda: fresh.pop().encode(text))
        ours.encode(text)
        warm_s, _ = best_of(args.repeats, lambda: ours.encode(text))
        hf_s, hf_enc = best_of(args.repeats, lambda: hf.encode(text))
        hf_batch_s, _ = best_of(args.repeats, lambda: hf.encode_batch(lines))
    if ids != hf_enc.ids:
        sys.exit("bench/tokenizer.py: ids differ from tokenizers; the comparison is void")

    name = "smoke text" if args.smoke else "general_english"
    table = "\n".join(
        [
            "| text | vocab | tokens | ours train s | tokenizers train s | ours cold MB/s "
            "| ours warm MB/s | tokenizers MB/s | tokenizers batch MB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {name} {mb:.2f} MB | {ours.vocab_size} | {len(ids)} "
            f"| {ours_train_s:.2f} | {hf_train_s:.2f} | {mb / cold_s:.2f} | {mb / warm_s:.2f} "
            f"| {mb / hf_s:.2f} | {mb / hf_batch_s:.2f} |",
        ]
    )
    body = "\n\n".join(
        [
            sitting.preamble(),
            "Work: our byte-level BPE (`tokenizer/bpe.py`, the teaching copy) against the "
            "`tokenizers` library on the same vocabulary and merges (ids checked equal first), "
            f"general English ({mb:.2f} MB: the-verdict.txt and wikitext2_test_part_a.txt), vocabulary "
            f"{args.vocab_size}; training once each, encoding the best of {args.repeats}.",
            table,
            "Cold: a freshly loaded tokenizer; warm: its per-word cache filled. tokenizers MB/s is "
            "one `encode()` over the whole text; batch is `encode_batch` over lines on all cores.",
        ]
    )
    print(table)
    common.publish(TITLE, body, args.smoke, not args.no_write)


if __name__ == "__main__":
    main()
