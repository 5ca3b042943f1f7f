"""From scratch: gpt2-tiny from random weights with our own BPE, validation loss vs CPU time.

    python bench/scratch.py [--steps 300] [--eval-every 50] [--vocab-size 8000] [--write]
    python bench/scratch.py --smoke   # a tiny written corpus, 2 steps: keeps the script working

Corpus: ../shared/data/general_english (WikiText-2 test part, "The Verdict") and
../shared/data/movie_plots (the two Wikipedia plot CSVs, de-duplicated on their Wiki page; the
CMU head file is a loader fixture with a damaged last line, so it is left out). Whole units are
held out for validation, never pieces of a unit seen in training: a WikiText article, a film.
Our byte-level BPE (tokenizer/bpe.py) is trained on the training side only, then `run_training`
(what `tunelab pretrain --arch gpt2-tiny` runs) trains with packed rows.

Cost is process CPU time (time.process_time: every torch thread counts) and wall time, both from
the start of `run_training`, so data encoding and model init are included; the validation passes
themselves are subtracted, so a point says what the training up to it cost. With --write the
table replaces the '## From scratch' section of docs/BENCHMARKS.md (added at the end if absent).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

DATA = common.SHARED
SECTION = "From scratch"
EOS = "<|endoftext|>"


def wikitext_articles(path: Path) -> list[list[str]]:
    """WikiText as articles (lists of paragraphs); headings are dropped, they are not prose."""
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if re.fullmatch(r"= [^=].*[^=] =", line):  # a top-level title starts a new article
            articles.append([])
        elif not line.startswith("="):
            if not articles:
                articles.append([])
            articles[-1].append(line)
    return [a for a in articles if a]


def plots(paths: list[Path]) -> list[str]:
    """Plot texts, one per film: the files list a few films twice (see their PROVENANCE)."""
    seen, out = set(), []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row["Wiki Page"] not in seen and row["Plot"].strip():
                    seen.add(row["Wiki Page"])
                    out.append(row["Plot"].replace("\r\n", "\n").strip())
    return out


def corpus(seed: int, val_fraction: float, data: Path = DATA) -> tuple[list[str], list[str], dict]:
    """(train documents, validation documents, counts): units split before they are chunked."""
    general = data / "general_english"
    movies = data / "movie_plots"
    verdict = (general / "the-verdict.txt").read_text(encoding="utf-8")
    units = {
        "wikitext": wikitext_articles(general / "wikitext2_test_part_a.txt"),
        "verdict": [[p for p in re.split(r"\n\s*\n", verdict) if p.strip()]],  # one story
        "plots": [[p] for p in plots(sorted(movies.glob("wiki_movie_plots_*.csv")))],
    }
    rng = random.Random(seed)
    train, val, counts = [], [], {}
    for name, group in units.items():
        order = list(range(len(group)))
        rng.shuffle(order)
        n_val = round(val_fraction * len(group)) if len(group) > 1 else 0
        held = set(order[:n_val])
        for i, unit in enumerate(group):
            (val if i in held else train).extend(unit)
        counts[name] = (len(group) - n_val, n_val)
    return train, val, counts


def chunks(doc: str, words: int) -> list[str]:
    """A document cut at word boundaries into pieces of at most `words` words.

    Why: build_data truncates every document to seq_len tokens *before* packing, so a long
    plot would lose its tail; pieces shorter than a row keep all the text.
    """
    pieces = re.findall(r"\S+\s*", re.sub(r"\n\s*\n", "\n", doc))
    return ["".join(pieces[i : i + words]).strip() for i in range(0, len(pieces), words)]


class CostMeter:
    """A loop callback: evaluates at step 0, and times every evaluation so it can be subtracted."""

    def __init__(self, start_cpu: float, start_wall: float):
        self.start_cpu, self.start_wall = start_cpu, start_wall
        self.eval_cpu = self.eval_wall = 0.0
        self.points: list[dict] = []
        self.ready: dict = {}

    def on_start(self, trainer) -> None:
        self.ready = {"cpu": time.process_time(), "wall": time.perf_counter()}
        evaluate = trainer.evaluate

        def timed() -> dict:
            cpu, wall = time.process_time(), time.perf_counter()
            point = {
                "step": trainer.step,
                "tokens": trainer.tokens,
                "cpu_s": cpu - self.start_cpu - self.eval_cpu,
                "wall_s": wall - self.start_wall - self.eval_wall,
            }
            result = evaluate()
            self.eval_cpu += time.process_time() - cpu
            self.eval_wall += time.perf_counter() - wall
            self.points.append({**point, "val_loss": result["val_loss"]})
            return result

        trainer.evaluate = timed  # the loop calls trainer.evaluate(); our wrapper answers

    def on_step(self, trainer, step: int) -> None:
        # step 0: the loss of the random model (the Trainer is fully built only after on_start)
        if step == 0 and not self.points:
            trainer.evaluate()

    def on_resume(self, trainer, step: int) -> None:
        pass

    def on_optimizer(self, trainer) -> None:
        pass


def smoke_data(root: Path) -> Path:
    """A tiny corpus in the shared layout: two WikiText articles, a story, four film plots."""
    general, movies = root / "general_english", root / "movie_plots"
    general.mkdir(parents=True)
    movies.mkdir()
    sentence = "The river ran past the old mill and the children watched the boats go by. "
    (general / "wikitext2_test_part_a.txt").write_text(
        "".join(f" = Article {i} = \n\n {sentence * 6}\n\n" for i in range(4))
    )
    (general / "the-verdict.txt").write_text((sentence * 4 + "\n\n") * 3)
    with open(movies / "wiki_movie_plots_a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["Wiki Page", "Plot"])
        w.writeheader()
        for i in range(6):
            w.writerow({"Wiki Page": f"film-{i}", "Plot": f"A hero number {i} rides. " * 20})
    return root


def run(args, work: Path, data: Path = DATA) -> dict:
    from tunelab.tokenizer.bpe import BPETokenizer
    from tunelab.tokenizer.tokenizer import Tokenizer
    from tunelab.train.config import load_config
    from tunelab.train.run import run_training

    train_docs, val_docs, units = corpus(args.seed, args.val_fraction, data)
    # Pieces of at most seq_len / 2 words: WikiText and plots take ~1.3 tokens a word with an
    # 8000-token vocabulary, so nearly every piece fits a row whole.
    words = args.seq_len // 2
    train_pieces = [c for d in train_docs for c in chunks(d, words)]
    val_pieces = [c for d in val_docs for c in chunks(d, words)]
    random.Random(args.seed).shuffle(val_pieces)  # capped evaluation sees a mix of sources
    for name, pieces in (("train", train_pieces), ("val", val_pieces)):
        (work / name).mkdir()
        (work / name / f"{name}.txt").write_text("\n\n".join(pieces), encoding="utf-8")

    cpu, wall = time.process_time(), time.perf_counter()
    bpe = BPETokenizer.train(train_docs, args.vocab_size, special_tokens=[EOS])
    tok_cpu, tok_wall = time.process_time() - cpu, time.perf_counter() - wall
    bpe.save(work / "tok")
    (work / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    tokenizer = Tokenizer.from_dir(work / "tok")
    val_tokens = sum(len(ids) + 1 for ids in tokenizer.encode_batch(val_pieces))  # + EOS

    # The same validation tokens whatever the batch size: the first rows of the held-out set.
    eval_batches = math.ceil(args.eval_tokens / (args.batch_size * args.seq_len))
    cfg = load_config(
        overrides={
            "task": "pretrain",
            "arch": "gpt2-tiny",
            "tokenizer": str(work / "tok"),
            "out": str(work / "run"),
            "data.path": str(work / "train"),
            "data.val_path": str(work / "val"),
            "data.pack": True,
            "train.seq_len": args.seq_len,
            "train.batch_size": args.batch_size,
            "train.lr": args.lr,
            "train.weight_decay": 0.1,
            "train.warmup_steps": max(1, args.steps // 20),
            "train.max_steps": args.steps,
            "train.eval_every": args.eval_every,
            "train.eval_batches": eval_batches,
            "train.save_every": None,
            "train.seed": args.seed,
            "train.device": "cpu",
        }
    )
    meter = CostMeter(time.process_time(), time.perf_counter())
    summary = run_training(cfg, callbacks=[meter])
    total_cpu = time.process_time() - meter.start_cpu
    total_wall = time.perf_counter() - meter.start_wall

    import tunelab

    lm = tunelab.load(work / "run" / "final")
    sample = lm.generate("The film", max_new_tokens=40, temperature=0.8, top_k=40, seed=0)
    return dict(
        points=meter.points,
        summary=summary,
        units=units,
        sample=sample,
        vocab=bpe.vocab_size,
        tok_cpu=tok_cpu,
        tok_wall=tok_wall,
        train_tokens=summary["data"]["train_tokens"],
        val_tokens=val_tokens,
        train_pieces=len(train_pieces),
        val_pieces=len(val_pieces),
        eval_tokens=min(val_tokens, eval_batches * args.batch_size * args.seq_len),
        prep_cpu=meter.ready["cpu"] - meter.start_cpu,
        prep_wall=meter.ready["wall"] - meter.start_wall,
        eval_cpu=meter.eval_cpu,
        eval_wall=meter.eval_wall,
        total_cpu=total_cpu,
        total_wall=total_wall,
    )


def table(r: dict) -> str:
    rows = [
        "| step | tokens seen | CPU min | wall min | val loss | val ppl |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["points"]:
        rows.append(
            f"| {p['step']} | {p['tokens']:,} | {p['cpu_s'] / 60:.2f} | {p['wall_s'] / 60:.2f} "
            f"| {p['val_loss']:.3f} | {math.exp(p['val_loss']):.1f} |"
        )
    return "\n".join(rows)


def report(args, r: dict, sitting) -> str:
    s, u = r["summary"], r["units"]
    params = s["total_params"]
    sample = " ".join(r["sample"].split())
    shared = ""
    if max(sitting.load_before, common.load()) > 0.75 * (os.cpu_count() or 1):
        # Other jobs competing for the cores slow every step (and spin torch's threads), so
        # the minutes say less than the losses, which depend only on the step.
        shared = (
            " The machine was shared with other jobs during this run: CPU and wall minutes are "
            "inflated (wall most); the loss at each step does not depend on the load."
        )
    return f"""{sitting.preamble()}{shared}

Work: `gpt2-tiny` ({params / 1e6:.2f}M \
parameters, embeddings tied) from random weights on a BPE vocabulary of {r["vocab"]} trained \
here on the training side ({r["tok_wall"]:.1f} s). Corpus: general_english (WikiText-2 test \
part, {u["wikitext"][0]} + {u["wikitext"][1]} articles, and "The Verdict") and movie_plots \
({u["plots"][0]} + {u["plots"][1]} films, de-duplicated); validation holds out whole articles \
and films. Documents are cut into pieces of at most {args.seq_len // 2} words and packed into \
rows of {args.seq_len} tokens: {r["train_tokens"]:,} training tokens \
({r["train_pieces"]:,} pieces), {r["val_tokens"]:,} validation tokens, of which the first \
{r["eval_tokens"]:,} are scored at each evaluation. Batch {args.batch_size} × {args.seq_len}, \
AdamW lr {args.lr:g} (weight decay 0.1), {max(1, args.steps // 20)} warmup steps then cosine to \
10%, {args.steps} steps ({s["tokens"] / r["train_tokens"]:.2f} epochs), fp32, seed {args.seed}.

{table(r)}

CPU min: process CPU time (all torch threads) from the start of `run_training` to the \
evaluation, less the time of the earlier evaluations: data encoding and model init are in \
({r["prep_cpu"]:.1f} CPU s, {r["prep_wall"]:.1f} s wall), scoring is not \
({r["eval_cpu"] / 60:.2f} CPU min in all). Whole run: {r["total_cpu"] / 60:.2f} CPU min, \
{r["total_wall"] / 60:.2f} min wall, {s["tokens_per_s"]:,.0f} training tokens/s. Step 0 is \
the random model: ln {r["vocab"]} = {math.log(r["vocab"]):.2f}. Sample from the final model \
(temperature 0.8, top-k 40): "The film{sample}"
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=24576, help="scored per evaluation")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the run directory here (default: none)")
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--smoke", action="store_true", help="a tiny corpus, 2 steps, no docs")
    args = parser.parse_args(argv)
    sitting = common.Sitting(common.command_line("scratch.py", argv))
    data = DATA
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.smoke:
            args.steps, args.eval_every, args.vocab_size = 2, 1, 300
            args.seq_len, args.batch_size, args.eval_tokens = 32, 2, 64
            args.val_fraction = 0.34  # a unit of each source held out
            data = smoke_data(work / "data")
        if not (data / "general_english").is_dir() or not (data / "movie_plots").is_dir():
            raise SystemExit(f"bench/scratch.py: needs {data}/general_english and movie_plots")
        # A fresh encode cache, so data encoding is measured rather than read back.
        cache = os.environ.get("TUNELAB_CACHE")
        os.environ["TUNELAB_CACHE"] = str(work / "cache")
        try:
            r = run(args, work, data)
        finally:  # other benchmarks in this process (run_all --smoke) keep the usual cache
            if cache is None:
                os.environ.pop("TUNELAB_CACHE", None)
            else:
                os.environ["TUNELAB_CACHE"] = cache
        if args.keep:
            import shutil

            shutil.copytree(work / "run", args.keep, dirs_exist_ok=True)
        body = report(args, r, sitting)
        print(f"## {SECTION}\n\n{body}")
        if args.smoke:
            common.write_section(SECTION, body, work / "BENCHMARKS.md")
        elif args.write:
            common.write_section(SECTION, body)
            print(f"wrote the '## {SECTION}' section of {common.DOC}")


if __name__ == "__main__":
    main()
