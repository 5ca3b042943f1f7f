"""Tiny random models with a BPE tokenizer of our own, written as model directories for tests."""

import json
import random

import torch

from tunelab.model.checkpoint import save_model_dir
from tunelab.model.config import ModelConfig
from tunelab.model.heads import build_model
from tunelab.tokenizer.bpe import BPETokenizer
from tunelab.tokenizer.tokenizer import Tokenizer

GOOD = "great wonderful superb moving brilliant".split()
BAD = "awful boring dreadful dull terrible".split()
FILL = "the film plot actor scene story music city night".split()


def review(rng: random.Random, label: int) -> str:
    """A few filler words with one sentiment word: separable by a single token."""
    words = [rng.choice(FILL) for _ in range(rng.randint(4, 9))]
    words.insert(rng.randrange(len(words)), rng.choice(GOOD if label else BAD))
    return " ".join(words)


def write_reviews(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = i % 2
            f.write(
                json.dumps(
                    {
                        "id": i,
                        "review": review(rng, label),
                        "sentiment": ["negative", "positive"][label],
                    }
                )
                + "\n"
            )


def icl_args(root) -> list[str]:
    """`evaluate icl` on the icl_setup fixture's reviews (conftest.py), at 0 and 2 shots."""
    return [
        "evaluate",
        "icl",
        "--model",
        str(root / "decoder"),
        "--data",
        str(root / "test.jsonl"),
        "--demos",
        str(root / "train.jsonl"),
        "--text-field",
        "review",
        "--label-field",
        "sentiment",
        "--shots",
        "0,2",
    ]


def make_models(root, corpus: list[str] | None = None) -> dict:
    """root/tok, root/decoder (llama-style) and root/encoder (BERT-style), tiny and random."""
    rng = random.Random(0)
    corpus = corpus or [review(rng, i % 2) for i in range(200)]
    bpe = BPETokenizer.train(corpus, vocab_size=300, special_tokens=["<|endoftext|>"])
    bpe.save(root / "tok")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = Tokenizer.from_dir(root / "tok")
    torch.manual_seed(0)
    common = dict(
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=4,
        d_model=64,
        d_ff=128,
        max_seq_len=128,
        eos_token_id=tok.eos_id,
    )
    save_model_dir(build_model(ModelConfig(family="llama", **common)), tok, root / "decoder")
    bert = ModelConfig(
        family="bert",
        pos="learned",
        norm="layernorm",
        post_norm=True,
        mlp="gelu",
        act="gelu",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        causal=False,
        type_vocab_size=2,
        pooler=True,
        **common,
    )
    save_model_dir(build_model(bert), tok, root / "encoder")
    return {"tok": root / "tok", "decoder": root / "decoder", "encoder": root / "encoder"}
