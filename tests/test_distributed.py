"""Distribution on CPU with gloo: two ranks on loopback under torchrun, against one process.

Most two-rank runs share one torchrun launch (a driver calls the CLI once per run, as k-fold
runs do, on one process group): starting torch costs more than the runs on a small machine.
"""

import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tunelab.cli import main
from tunelab.data.batching import FILLER, Batches
from tunelab.errors import ConfigError, DataError
from tunelab.tokenizer.bpe import BPETokenizer
from tunelab.train.distributed import setup

WORDS = "the a film plot hero villain city storm love war ship island night river king".split()
STEPS = ["--max-steps", "4"]
DRIVER = """import json, sys
from tunelab.cli import main
sys.exit(max(main(args) for args in json.load(open(sys.argv[1]))))
"""
FAILING = """import os, sys
import torch.distributed as dist
from tunelab.cli import main
from tunelab.train.loop import Trainer
step = Trainer.train_step
def train_step(self):  # rank 1 breaks in its second step, while rank 0 waits on it
    if os.environ["RANK"] == "1" and self.step == 1:
        raise RuntimeError("injected failure")
    return step(self)
Trainer.train_step = train_step
def tell(name, call):  # say on stderr which way each rank ended its group
    def told(*args, **kwargs):
        print(f"rank {os.environ['RANK']} called {name}", file=sys.stderr, flush=True)
        return call(*args, **kwargs)
    return told
dist.barrier = tell("barrier", dist.barrier)
c10d = dist.distributed_c10d
c10d._abort_process_group = tell("abort", c10d._abort_process_group)
sys.exit(main(sys.argv[1:]))
"""


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root, script: str | None, *args, timeout=240) -> subprocess.CompletedProcess:
    """Run a script (None: the tunelab command) on two CPU ranks, one thread each."""
    target = ["-m", "tunelab"]
    if script is not None:
        target = [str(root / f"{abs(hash(script))}.py")]
        (root / target[0]).write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", TUNELAB_CACHE=str(root / "cache"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *target,
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def weights(run) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def resumable(run, to, step: int = 2):
    """A copy of a run's config and step-N checkpoint, as if it had been stopped there."""
    to.mkdir()
    shutil.copy(run / "config.yaml", to / "config.yaml")
    shutil.copytree(run / "checkpoints" / f"step-{step}", to / "checkpoints" / f"step-{step}")
    return to


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Single-process runs (batch 4) and the same runs on two ranks (batch 2 each)."""
    root = tmp_path_factory.mktemp("dist")
    saved, threads = os.environ.get("TUNELAB_CACHE"), torch.get_num_threads()
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    torch.set_num_threads(1)  # the ranks take one core each: two threads here crawl under load
    (root / "corpus.txt").write_text("\n\n".join(sentences(120)))
    tok = BPETokenizer.train(
        sentences(200, seed=1), vocab_size=320, special_tokens=["<|endoftext|>"]
    )
    tok.save(root / "tok")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    # A constant LR makes resuming at step 2 of 4 exact. A small one keeps AdamW's answer to
    # rounding noise under 1e-5: its steps are about lr whatever the gradient's size, and a
    # gradient near eps (1e-8) turns noise into a step.
    common = [
        "pretrain",
        "--arch",
        "gpt2-tiny",
        "--tokenizer",
        str(root / "tok"),
        "--data",
        str(root / "corpus.txt"),
        "--seq-len",
        "48",
        "--lr",
        "2e-5",
        "--grad-accum",
        "2",
        "--train.schedule",
        "constant",
        "--train.warmup_steps",
        "0",
        *STEPS,
        "--save-every",
        "2",
    ]
    methods = {
        "lora": ["--method", "lora", "--method.r", "4"],
        "gradual": ["--method", "freeze", "--method.every_steps", "1"],
    }
    # A validation set of one example: the second rank has nothing of it to score.
    (root / "val1.txt").write_text(sentences(1, seed=2)[0])
    val1 = ["--val-data", str(root / "val1.txt"), "--max-steps", "1"]
    for name, extra in {"full": [], "val1": val1, **methods}.items():
        assert main([*common, "--batch-size", "4", "--out", str(root / f"one-{name}"), *extra]) == 0
    # The plain command, as users launch it, for the run the other tests compare most with.
    two = [*common, "--batch-size", "2"]
    proc = torchrun(root, None, *two, "--out", str(root / "two-full"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [[*two, "--out", str(root / f"two-{n}"), *extra] for n, extra in methods.items()]
    jobs.append([*two, "--out", str(root / "two-fsdp"), "--dist", "fsdp"])
    jobs.append([*two, "--out", str(root / "two-val1"), *val1])
    jobs.append([*two, "--out", str(root / "two-val1-fsdp"), "--dist", "fsdp", *val1])
    # activation checkpointing changes no number: the same runs with blocks recomputed
    ckpt = "--activation-checkpointing"
    jobs.append([*two, "--out", str(root / "two-fsdp-ckpt"), "--dist", "fsdp", ckpt])
    jobs.append([*two, "--out", str(root / "two-gradual-ckpt"), *methods["gradual"], ckpt])
    for name, extra in (("one-to-two", []), ("one-to-fsdp", ["--dist", "fsdp"])):
        resumed = resumable(root / "one-full", root / name)
        jobs.append(["pretrain", "--resume", str(resumed), "--batch-size", "2", *extra])
    (root / "jobs.json").write_text(json.dumps(jobs))
    driven = torchrun(root, DRIVER, str(root / "jobs.json"))
    assert driven.returncode == 0, driven.stderr[-3000:]
    for name in ("two-full", "two-fsdp"):  # the stored dist (fsdp) falls back to one process
        resumed = resumable(root / name, root / f"{name}-to-one")
        assert main(["pretrain", "--resume", str(resumed), "--batch-size", "4"]) == 0
    yield root
    torch.set_num_threads(threads)
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def assert_same_run(one, two) -> None:
    """Weights within 1e-5, and per step the same loss, gradient norm and tokens.

    AdamW hardly sees a gradient's scale, so the norm is what shows a mean over ranks where a
    sum belongs (it would halve) or a shard read twice."""
    assert max_diff(weights(one), weights(two)) < 1e-5
    rows = {r["step"]: r for r in train_rows(one)}
    for b in train_rows(two):
        for key in ("loss", "grad_norm", "tokens_step"):
            assert b[key] == pytest.approx(rows[b["step"]][key], rel=1e-5), (b["step"], key)


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    root = runs
    assert_same_run(root / "one-full", root / "two-full")
    assert len(train_rows(root / "two-full")) == 4  # rank 0 alone logs
    one = json.loads((root / "one-full" / "summary.json").read_text())
    two = json.loads((root / "two-full" / "summary.json").read_text())
    assert two["tokens"] == one["tokens"]  # tokens counted over both ranks
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)


def test_checkpoints_resume_across_world_sizes(runs):
    root = runs
    ckpt = load_file(str(root / "two-full" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert not any(k.startswith("module.") for k in ckpt)
    assert_same_run(root / "one-full", root / "two-full-to-one")  # written by 2, resumed by 1
    assert_same_run(root / "one-full", root / "one-to-two")  # written by 1, resumed by 2 ranks
    assert [r["step"] for r in train_rows(root / "one-to-two")] == [3, 4]


def test_fsdp_on_gloo_matches_and_resumes_across_world_sizes(runs):
    root = runs
    assert_same_run(root / "one-full", root / "two-fsdp")
    assert_same_run(root / "one-full", root / "two-fsdp-ckpt")  # blocks recomputed in backward
    assert_same_run(root / "one-full", root / "two-fsdp-to-one")  # shards gathered when saved
    assert_same_run(root / "one-full", root / "one-to-fsdp")  # whole tensors cut when loaded


@pytest.mark.parametrize(
    "method, run",
    [("lora", "two-lora"), ("gradual", "two-gradual"), ("gradual", "two-gradual-ckpt")],
)
def test_lora_and_gradual_unfreezing_match_under_ddp(runs, method, run):
    """two-gradual-ckpt: with activation checkpointing, as the DDP wrapper is rebuilt."""
    root = runs
    assert_same_run(root / f"one-{method}", root / run)
    if method == "lora":
        a = load_file(str(root / "one-lora" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(root / "two-lora" / "adapter" / "adapter_model.safetensors"))
        assert max_diff(a, b) < 1e-5


@pytest.mark.parametrize("run", ["two-val1", "two-val1-fsdp"])
def test_a_validation_set_smaller_than_the_world_scores_as_one_process(runs, run):
    one = json.loads((runs / "one-val1" / "summary.json").read_text())
    two = json.loads((runs / run / "summary.json").read_text())
    assert one["data"]["val_examples"] == 1
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], rel=1e-5)


def test_evaluation_shards_keep_every_example_and_ranks_in_step():
    examples = [{"input_ids": [i + 1] * (1 + i % 3)} for i in range(5)]
    ranks = [
        Batches(examples, 2, pad_id=0, shuffle=False, rank=r, world_size=2, keep_all=True)
        for r in range(2)
    ]
    assert [len(b) for b in ranks] == [2, 2]  # the same number of forwards on every rank
    plans = [b.plan(0) for b in ranks]
    assert sorted(i for plan in plans for batch in plan for i in batch) == list(range(5))
    assert plans[1][-1] == []  # 5 examples: rank 1 has none in the last global batch
    batches = list(ranks[1])
    assert [bool(b.get(FILLER)) for b in batches] == [False, True]
    with pytest.raises(DataError, match="1 examples make no batch"):
        Batches(examples[:1], 2, pad_id=0, rank=1, world_size=2)  # training still shards evenly


def test_a_failing_rank_ends_the_job_with_its_error(runs, tmp_path):
    root = runs
    out = tmp_path / "broken"
    args = [
        "pretrain",
        "--arch",
        "gpt2-tiny",
        "--tokenizer",
        str(root / "tok"),
        "--data",
        str(root / "corpus.txt"),
        "--seq-len",
        "48",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--out",
        str(out),
    ]
    proc = torchrun(tmp_path, FAILING, *args, timeout=120)  # a hang would be gloo's 30 minutes
    assert proc.returncode != 0
    assert "rank 1 of 2 failed: RuntimeError: injected failure" in proc.stderr
    assert not (out / "summary.json").exists()
    # The failing rank aborts the group at once rather than waiting for the other at a barrier
    assert "rank 1 called abort" in proc.stderr
    assert "rank 1 called barrier" not in proc.stderr


def test_ranks_get_disjoint_equal_shards_of_the_global_batch():
    examples = [{"input_ids": [i] * (1 + i % 5)} for i in range(24)]
    one = Batches(examples, 4, pad_id=0, seed=3, group_by_length=True)
    two = [
        Batches(examples, 2, pad_id=0, seed=3, rank=r, world_size=2, group_by_length=True)
        for r in range(2)
    ]
    assert len(two[0]) == len(two[1])
    for epoch in range(2):
        plans = [b.plan(epoch) for b in two]
        seen = [i for plan in plans for batch in plan for i in batch]
        assert len(seen) == len(set(seen)) == len(examples)  # every example once, no overlap
        for k, (a, b) in enumerate(zip(*plans)):  # together: the single process's batch k
            assert sorted(a + b) == sorted(one.plan(epoch)[k])


def test_setup_without_torchrun_is_a_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    d = setup("auto", "cpu")
    assert not d.active and d.is_main and d.world == 1
    x, model = torch.ones(2), torch.nn.Linear(2, 2)
    assert d.reduce(x) is x and d.wrap(model) is model and d.broadcast("a") == "a"
    with pytest.raises(ConfigError, match="did you mean 'ddp'"):
        setup("dpp", "cpu")
    assert not setup("fsdp", "cpu").active  # a recipe's choice, outside torchrun: one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="every rank would train alone"):
        setup("none", "cpu")
