"""`tunelab image generate|train|calibrate` and `tunelab evaluate counting`: text-to-image
generation with a diffusers pipeline or a tiny model of our own, and counting what it drew."""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.cli.common import at_least, emit

MODEL_HELP = "a diffusers pipeline folder (model_index.json), a tunelab image model or a hub id"


def _progress(total: int, label: str):
    """A rich bar advanced once per image (silent when stderr is not a terminal)."""
    from tunelab.train.progress import Progress

    return Progress(total, label=label)


def cmd_generate(a) -> None:
    from tunelab.image.pipeline import Settings, check_out, generate, load_pipeline, write_images

    out = Path(a.out)
    check_out(out)
    pipeline = load_pipeline(a.model, a.device)
    t0 = time.perf_counter()
    s = Settings(a.prompt, a.n, a.steps, a.size, a.guidance, a.seed, a.negative_prompt)
    with _progress(a.n, "image") as bar:
        images, used = generate(pipeline, s, on_image=lambda i: bar.advance())
    sidecar = write_images(images, out, used, pipeline, time.perf_counter() - t0)
    emit(a, sidecar, f"{len(images)} images in {out} (settings in {out / 'images.json'})")


def cmd_counting(a) -> None:
    from tunelab.image.counters import make_counter
    from tunelab.image.counting import evaluate, generate_set, read_manifest, summary_text
    from tunelab.image.pipeline import check_out, load_pipeline
    from tunelab.image.prompts import expand, read_spec

    out = Path(a.out)
    check_out(out)
    options = {"threshold": a.threshold} if a.threshold is not None else {}
    counter = make_counter(a.counter, **options)
    extra = {}
    if a.images:
        folder = Path(a.images)
        rows = read_manifest(folder)
        for obj in sorted({r["object"] for r in rows}):
            counter.check_class(obj)
    else:
        if not a.model:
            from tunelab.errors import ConfigError

            raise ConfigError("evaluate counting: give --model (generate, then count) or --images")
        spec = read_spec(a.prompts) if a.prompts else {}
        prompts = expand(spec, counter, where=f"--prompts {a.prompts}" if a.prompts else "prompts")
        n = a.n or int(spec.get("images", 4))
        pipeline = load_pipeline(a.model, a.device)
        with _progress(n * len(prompts), "image") as bar:
            rows = generate_set(
                pipeline,
                prompts,
                n,
                out,
                a.seed,
                a.steps,
                a.guidance,
                progress=lambda i: bar.advance(),
            )
        folder = out / "images"
        extra = {
            "model": a.model,
            "prompts_file": a.prompts,
            "settings": {
                "n": n,
                "seed": a.seed,
                "steps": rows[0]["steps"],
                "guidance": rows[0]["guidance"],
            },
        }
    with _progress(len(rows), "count") as bar:
        summary = evaluate(folder, rows, counter, out, extra, progress=lambda i: bar.advance())
    emit(a, summary, summary_text(summary) + f"\nreport: {out / 'report.md'}")


def cmd_train(a) -> None:
    from tunelab.train.image import load_image_config, run_image_training

    overrides = {k: v for k, v in vars(a).items() if "." in k}
    if a.resume:  # the run's own config, the command line's overrides on top
        cfg = load_image_config(str(Path(a.resume) / "config.yaml"), overrides)
        cfg.out, cfg.resume = a.resume, True
    else:
        cfg = load_image_config(a.config, overrides)
    if a.out and not a.resume:
        cfg.out = a.out
    if a.max_steps:
        cfg.train.max_steps = a.max_steps
    summary = run_image_training(cfg)
    emit(
        a,
        summary,
        f"trained {summary['steps']} steps in {summary['wall_time_s']:.0f} s; "
        f"model: {Path(cfg.out) / 'final'}",
    )


def cmd_calibrate(a) -> None:
    from tunelab.image.calibrate import calibrate, write_calibration
    from tunelab.image.detector import CALIBRATION, SSDMobileNet

    result = calibrate(SSDMobileNet(), seeds=range(a.seeds))
    path = Path(a.write) if a.write else CALIBRATION
    write_calibration(result, path)
    emit(
        a,
        result,
        f"threshold {result['threshold']}: exact-count accuracy {result['accuracy']:.3f} "
        f"on {result['images']} composed images; written to {path}",
    )


def counting_parser(ev) -> None:
    """`evaluate counting`, registered by cli/evaluate.py."""
    q = ev.add_parser(
        "counting",
        help="text-to-image counting: generate, count, exact-count "
        "accuracy per number, class and prompt variant",
    )
    q.add_argument("--model", default=None, help=MODEL_HELP)
    q.add_argument(
        "--images",
        default=None,
        help="score these images instead: DIR with manifest.jsonl lines "
        '{"image": "f.png", "object": "cat", "expected": 3}',
    )
    q.add_argument(
        "--prompts",
        default=None,
        help="YAML: variants (templates with {number}/{digit} and {object}), numbers, "
        "classes; default GenEval-style",
    )
    q.add_argument("--n", type=at_least(1), default=None, help="images per prompt [4]")
    q.add_argument("--steps", type=at_least(1), default=None, help="denoising steps")
    q.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--counter",
        default="ssd-mobilenet",
        help="components (rendered shapes), ssd-mobilenet (COCO) or module:Class",
    )
    q.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="detector confidence threshold [the calibrated one]",
    )
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", required=True, help="new folder: images, scores, grid, report")
    q.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    q.set_defaults(func=cmd_counting)


def register(sub) -> None:
    p = sub.add_parser("image", help="text-to-image: generate, train a tiny model, calibrate")
    im = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = im.add_parser("generate", help="images for one prompt, with a JSON sidecar of settings")
    q.add_argument("--model", required=True, help=MODEL_HELP)
    q.add_argument("--prompt", required=True)
    q.add_argument("--negative-prompt", default=None)
    q.add_argument("--n", type=at_least(1), default=4, help="images [4]")
    q.add_argument("--steps", type=at_least(1), default=None, help="denoising steps")
    q.add_argument("--size", type=at_least(8), default=None, help="pixels [the model's own]")
    q.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    q.add_argument("--seed", type=int, default=0, help="image i uses seed + i [0]")
    q.add_argument("--device", default="cpu")
    q.add_argument("--out", required=True, help="new folder for the PNGs and images.json")
    q.add_argument("--json", action="store_true", help="print the sidecar on stdout")
    q.set_defaults(func=cmd_generate)

    q = im.add_parser("train", help="train the tiny text-to-image model on rendered shapes")
    q.add_argument("--config", default=None, help="YAML: out, data, model, train sections")
    q.add_argument("--out", default=None, help="run folder")
    q.add_argument("--max-steps", type=at_least(1), default=None)
    q.add_argument("--resume", default=None, help="continue this interrupted run folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_train, overrides=True)

    q = im.add_parser("calibrate", help="the detector's threshold, from photos with known counts")
    q.add_argument("--seeds", type=at_least(1), default=3, help="composed images per class/count")
    q.add_argument("--write", default=None, help="file to write [the packaged calibration.json]")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_calibrate)
