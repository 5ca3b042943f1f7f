"""Training commands end to end on tiny models: from scratch, SFT, kill-and-resume, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.tokenizer.bpe import BPETokenizer

WORDS = "the a film plot hero villain city storm love war ship island night river king".split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(sentences(120)))
    tok = BPETokenizer.train(
        sentences(200, seed=1), vocab_size=320, special_tokens=["<|endoftext|>"]
    )
    tok.save(root / "tok")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    sft = root / "sft.jsonl"
    with open(sft, "w") as f:
        for i, s in enumerate(sentences(40, seed=2)):
            f.write(json.dumps({"instruction": f"Repeat {i}", "output": s}) + "\n")
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def scratch_args(setup, out, *extra):
    return [
        "pretrain",
        "--arch",
        "gpt2-tiny",
        "--tokenizer",
        str(setup / "tok"),
        "--data",
        str(setup / "corpus.txt"),
        "--out",
        str(out),
        "--seq-len",
        "48",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--train.dropout",
        "0.0",
        *extra,
    ]


def test_pretrain_from_scratch_learns_and_writes_a_run(setup, capsys):
    out = setup / "scratch"
    assert main(scratch_args(setup, out, "--max-steps", "30", "--eval-every", "10", "--json")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in (
        "wall_time_s",
        "tokens",
        "tokens_per_s",
        "peak_memory_mb",
        "trainable_params",
        "total_params",
        "final_val_loss",
        "best_val_loss",
    ):
        assert key in summary, key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert sum(1 for r in rows if r.get("split") == "val") == 3
    assert (out / "config.yaml").exists() and (out / "final" / "model.safetensors").exists()
    import tunelab

    lm = tunelab.load(out / "final")
    assert lm.perplexity("the film hero.", window=16, stride=8)["tokens"] > 0


def test_finetune_sft_runs(setup, capsys):
    out = setup / "sft"
    args = scratch_args(setup, out, "--max-steps", "4", "--json", "--seq-len", "192")
    args[0] = "finetune"
    args[args.index("--data") + 1] = str(setup / "sft.jsonl")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["data"]["kind"] == "instruction" and summary["steps"] == 4


def test_killed_run_resumes_bit_identical(setup):
    steps = ["--max-steps", "24", "--save-every", "4"]
    assert main(scratch_args(setup, setup / "straight", *steps)) == 0
    killed = setup / "killed"
    cmd = [sys.executable, "-m", "tunelab", *scratch_args(setup, killed, *steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while (
        not (killed / "checkpoints" / "step-8").exists()
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    assert main(["pretrain", "--resume", str(killed)]) == 0
    a = load_file(str(setup / "straight" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_data_is_one_line_error(setup, capsys):
    bad = setup / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": oops}\n')
    args = scratch_args(setup, setup / "bad", "--max-steps", "1")
    args[0] = "finetune"
    args[args.index("--data") + 1] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and len(err.splitlines()) == 1


def test_unknown_option_and_finished_run(setup, capsys):
    assert main(scratch_args(setup, setup / "x", "--train.lrr", "1")) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(scratch_args(setup, setup / "scratch", "--max-steps", "1")) == 2
    assert "finished run" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "qlora", "freeze"])
def test_methods_train_and_save_a_loadable_model(setup, method, capsys):
    out = setup / f"m-{method}"
    extra = ["--method.train_layers", "top:1"] if method == "freeze" else ["--method.r", "4"]
    assert (
        main(scratch_args(setup, out, "--max-steps", "3", "--method", method, *extra, "--json"))
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method
    assert summary["trainable_params"] < 0.5 * summary["total_params"]
    assert (out / "adapter" / "adapter_config.json").exists() == (method != "freeze")
    import tunelab

    assert (
        tunelab.load(out / "final").perplexity("the film hero.", window=16, stride=8)["tokens"] > 0
    )


def test_estimate_command_and_param_report(setup, capsys):
    out = setup / "scratch" / "final"
    if not out.exists():
        pytest.skip("needs the from-scratch run of this module")
    assert (
        main(["estimate", "--model", str(out), "--method", "lora", "--seq-len", "64", "--json"])
        == 0
    )
    est = json.loads(capsys.readouterr().out)
    assert est["flops"]["total"] > 0 and "fits" in json.dumps(est)
    summary = json.loads((setup / "scratch" / "summary.json").read_text())
    assert summary["params"]["trainable_params"] == summary["trainable_params"]


def test_tokenizer_train_and_merge_commands(setup, capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(sentences(50, seed=3)))
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                str(corpus),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    from tunelab.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tmp_path / "t")
    assert tok.vocab_size == 300 and tok.eos_id is not None
    assert tok.decode(tok.encode("the storm hero.")) == "the storm hero."
    lora = setup / "m-lora"
    if not (lora / "adapter").exists():
        pytest.skip("needs the LoRA run of this module")
    base = setup / "merge-base"
    # the LoRA run started from a fresh gpt2-tiny with seed 0: rebuild it to merge onto
    from tunelab.model.checkpoint import save_model_dir
    from tunelab.train.config import load_config
    from tunelab.train.run import load_for_training

    cfg = load_config(
        None, {"arch": "gpt2-tiny", "tokenizer": str(setup / "tok"), "train.seq_len": "48"}
    )
    model, tk = load_for_training(cfg, torch.device("cpu"))
    save_model_dir(model, tk, base)
    assert (
        main(
            [
                "merge",
                "--model",
                str(base),
                "--adapter",
                str(lora / "adapter"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(lora / "final" / "model.safetensors"))
    for k in b:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
