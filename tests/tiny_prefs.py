"""A tiny preference setup for the alignment tests: a BPE tokenizer, a random llama-style
base model and pairs whose chosen answer always ends with GOOD and the rejected with BAD."""

import json
import random

import torch

from tunelab.model.checkpoint import save_model_dir
from tunelab.model.config import preset
from tunelab.model.heads import build_model
from tunelab.tokenizer.bpe import BPETokenizer
from tunelab.tokenizer.tokenizer import Tokenizer
from tunelab.train.config import load_config
from tunelab.train.run import init_weights

WORDS = "the a film plot hero villain city storm love war ship island night river king".split()
GOOD, BAD = "hero king ship .", "storm war night ."


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_preference_setup(root) -> None:
    """root/tok, root/base (the model) and root/prefs.jsonl (80 learnable pairs)."""
    rng = random.Random(0)
    tok = BPETokenizer.train(
        [words(rng, 12) + "." for _ in range(200)], vocab_size=300, special_tokens=["<|endoftext|>"]
    )
    tok.save(root / "tok")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tokenizer = Tokenizer.from_dir(root / "tok")
    torch.manual_seed(0)
    cfg = preset(
        "llama-tiny",
        vocab_size=tokenizer.vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=128,
        max_seq_len=256,
        eos_token_id=tokenizer.eos_id,
    )
    model = build_model(cfg)
    init_weights(model)
    save_model_dir(model, tokenizer, root / "base")
    with open(root / "prefs.jsonl", "w") as f:
        for i in range(80):
            head = words(rng, rng.randint(1, 4))
            f.write(
                json.dumps(
                    {
                        "prompt": f"{words(rng, 4)} {i}?",
                        "chosen": f" {head} {GOOD}",
                        "rejected": f" {head} {BAD}",
                    }
                )
                + "\n"
            )


def align_cfg(setup, out, **over):
    base = {
        "task": "align",
        "model": str(setup / "base"),
        "data.path": str(setup / "prefs.jsonl"),
        "out": str(out),
        "train.seq_len": 64,
        "train.batch_size": 4,
        "train.lr": 1e-3,
        "train.max_steps": 3,
        "train.warmup_steps": 0,
        "train.device": "cpu",
        "data.val_fraction": 0.2,
    }
    return load_config(None, {**base, **over})
