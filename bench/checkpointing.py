"""Activation checkpointing: peak memory and seconds per step, with and without, on the CPU.

    python bench/checkpointing.py [--steps 3] [--warmup 1] [--seq-len 512] [--batch 4] [--no-write]
    python bench/checkpointing.py --smoke    # tests/test_checkpointing.py runs this

Full fine-tuning of SmolLM2-135M-Instruct (the embedded model, `tunelab.load`) on full rows of
random tokens (seq 512 x batch 4 = 2048 tokens a step; memory and time do not depend on which
tokens), dropout 0, through the Trainer's own step (oneDNN linears, AdamW, clipping), with
train.activation_checkpointing off and on. Each variant runs in its own subprocess (with the
glibc settings of the `tunelab` command), so its peak RSS (ru_maxrss: the whole process, model
loading included) is its own; seconds per step is the median of the timed steps after the
untimed warm-up. Writes the '## Activation checkpointing' section of docs/BENCHMARKS.md unless
--no-write; the last line of stdout is the rows as JSON. --smoke: a tiny random model, 2 steps
each way, both in this process (starting torch twice more would take longer than the work), and
docs/ left alone; its figures mean nothing, it keeps the script from rotting.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py)

MODEL = "smollm2-135m-instruct"
TITLE = "Activation checkpointing"


class RandomRows:
    """Full rows of random tokens, in the Trainer's data contract (forever, state_dict)."""

    def __init__(self, vocab: int, batch: int, seq_len: int):
        import torch

        self.shape, self.vocab = (batch, seq_len), vocab
        self.gen = torch.Generator().manual_seed(0)

    def forever(self):
        import torch

        while True:
            ids = torch.randint(self.vocab, self.shape, generator=self.gen)
            yield {"input_ids": ids, "labels": ids}

    def state_dict(self) -> dict:
        return {}


def worker(job: dict) -> dict:
    import torch

    import tunelab
    from tunelab.kernels import onednn_linears
    from tunelab.model.config import ModelConfig
    from tunelab.model.heads import CausalLM
    from tunelab.train.config import TrainConfig
    from tunelab.train.loop import Trainer
    from tunelab.train.objectives import causal_lm

    torch.manual_seed(0)
    if job["smoke"]:
        model = CausalLM(ModelConfig(vocab_size=256, n_layer=2, n_head=4, d_model=64, d_ff=128))
    else:
        model = tunelab.load(MODEL).model
    model.transformer.checkpoint_blocks = job["checkpointing"]  # as run_training sets it
    loaded = common.rss_mb()
    cfg = TrainConfig(batch_size=job["batch"], lr=1e-5, schedule="constant", warmup_steps=0)
    data = RandomRows(model.cfg.vocab_size, job["batch"], job["seq_len"])
    times, losses = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        steps = job["warmup"] + job["steps"]
        trainer = Trainer(model, causal_lm, data, cfg, Path(run_dir), steps)
        with onednn_linears(model):
            for _ in range(steps):
                started = time.perf_counter()
                losses.append(trainer.train_step()["loss"])
                times.append(time.perf_counter() - started)
    return dict(
        checkpointing=job["checkpointing"],
        loaded_rss_mb=round(loaded, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        s_per_step=round(statistics.median(times[job["warmup"] :]), 3),
        losses=losses,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, no docs")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(json.loads(sys.stdin.read()))), flush=True)
        return
    job = dict(smoke=a.smoke, steps=a.steps, warmup=a.warmup, seq_len=a.seq_len, batch=a.batch)
    if a.smoke:
        job.update(steps=1, warmup=1, seq_len=32, batch=2)
    sitting = common.Sitting(common.command_line("checkpointing.py", argv))
    rows = []
    for on in (False, True):
        variant = dict(job, checkpointing=on)
        rows.append(worker(variant) if a.smoke else common.spawn(__file__, "tunelab", variant))
        print(f"checkpointing {'on' if on else 'off'}: {rows[-1]}", file=sys.stderr, flush=True)
    off, on = rows
    table = "\n".join(
        [
            "| activation checkpointing | peak RSS (MiB) | RSS after loading (MiB) | s/step | "
            "loss per step |",
            "|:---|---:|---:|---:|:---|",
            *(
                f"| {'on' if r['checkpointing'] else 'off'} | {r['peak_rss_mb']:.0f} "
                f"| {r['loaded_rss_mb']:.0f} | {r['s_per_step']:.2f} "
                f"| {', '.join(f'{x:.4f}' for x in r['losses'])} |"
                for r in rows
            ),
            f"| **on / off** | **{on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x** | "
            f"| **{on['s_per_step'] / off['s_per_step']:.2f}x** | |",
        ]
    )
    body = "\n".join(
        [
            sitting.preamble(),
            "",
            f"Work: {MODEL}, full fine-tuning, fp32, seq len {a.seq_len}, batch {a.batch} (full rows "
            f"of random tokens), AdamW, clip 1.0, dropout 0; each variant in its own process (the "
            f"`tunelab` command's glibc settings); {a.steps} timed steps after {a.warmup} untimed, "
            "median s/step; one run of each variant (peak memory does not depend on the load).",
            "",
            table,
            "",
            "Peak RSS: ru_maxrss of the variant's process (model loading included). With "
            "checkpointing each block keeps only its input for backward and runs again there "
            "(`Transformer.checkpoint_blocks`, torch.utils.checkpoint, non-reentrant); the losses "
            "are the same either way.",
        ]
    )
    print("\n" + table)
    common.publish(TITLE, body, a.smoke, not a.no_write, file=sys.stderr)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
