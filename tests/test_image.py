"""Text-to-image and counting: generate with a tiny random diffusers pipeline, count, report;
the exact-count rule; the rendered domain's counts; the detector on photos with known counts;
the tiny model's training run; a study with a counting cell."""

from __future__ import annotations

import json

import numpy as np
import pytest
from image_tiny import make_sd_pipeline, make_tiny_model

from tunelab.cli import main
from tunelab.image.counters import ComponentCounter, Detection, count, exact, make_counter
from tunelab.image.prompts import default_spec, expand, fill
from tunelab.image.shapes import CLASSES, scene, vocabulary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    return {"sd": make_sd_pipeline(root), "tiny": make_tiny_model(root)}


def cli(argv, capsys) -> dict:
    assert main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_rendered_scenes_are_counted_exactly():
    counter = ComponentCounter()
    words = set(vocabulary())
    for size in (16, 32):
        for i in range(150):
            image, caption, n, obj = scene(i, seed=3, size=size)
            found = counter.detect(image)
            assert count(found, obj) == n and len(found) == n, (size, i, caption)
            assert set(caption.replace(",", "").split()) <= words


def test_exact_count_rule():
    found = [Detection((0, 0, 1, 1), "cat", 0.9)] * 3 + [Detection((0, 0, 1, 1), "dog", 0.9)]
    assert count(found, "cat") == 3 and exact(count(found, "cat"), 3)
    assert not exact(count(found, "cat"), 2) and not exact(count(found, "cat"), 4)
    assert exact(count(found, "bird"), 0)


def test_prompt_files_expand_and_check(tmp_path):
    assert fill("a photo of {number} {object}", 3, "person") == "a photo of three people"
    assert (
        fill("{digit} {object}", 1, "bus") == "1 bus"
        and fill("{digit} {object}", 2, "bus") == "2 buses"
    )
    counter = make_counter("ssd-mobilenet")
    prompts = expand({"numbers": [2], "classes": ["cat"]}, counter)
    assert [p.variant for p in prompts] == ["word", "digit", "exact"]
    assert prompts[2].text == "a photo of exactly two cats, no more, no fewer"
    assert default_spec(ComponentCounter())["classes"] == list(CLASSES)


def test_generate_is_seeded_and_records_every_setting(models, tmp_path, capsys):
    base = [
        "image",
        "generate",
        "--model",
        models["sd"],
        "--prompt",
        "two cats",
        "--steps",
        "2",
        "--json",
    ]
    side = cli([*base, "--n", "2", "--seed", "5", "--out", tmp_path / "a"], capsys)
    assert {"prompt", "n", "steps", "size", "guidance", "seed", "model", "versions"} <= set(side)
    assert [i["seed"] for i in side["images"]] == [5, 6] and side["guidance"] == 7.5
    assert side["model"]["pipeline"] == "StableDiffusionPipeline"
    cli([*base, "--n", "1", "--seed", "6", "--out", tmp_path / "b"], capsys)
    from PIL import Image

    again = np.asarray(Image.open(tmp_path / "b" / "image-000.png"))
    assert np.array_equal(again, np.asarray(Image.open(tmp_path / "a" / "image-001.png")))


def test_generate_count_report_end_to_end(models, tmp_path, capsys):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(
        json.dumps(
            {
                "variants": {
                    "word": "a photo of {number} {object}",
                    "digit": "a photo of {digit} {object}",
                },
                "numbers": [1, 2],
                "classes": ["cat"],
            }
        )
    )
    out = tmp_path / "ev"
    s = cli(
        [
            "evaluate",
            "counting",
            "--model",
            models["sd"],
            "--prompts",
            prompts,
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            out,
            "--json",
        ],
        capsys,
    )
    assert s["images"] == 4 and s["prompts"] == 4 and set(s["by_variant"]) == {"word", "digit"}
    assert set(s["by_count"]) == {"1", "2"} and 0 <= s["accuracy"] <= 1
    lo, hi = s["accuracy_interval"]
    assert lo <= s["accuracy"] <= hi
    assert s["counter"]["name"] == "ssd-mobilenet" and "threshold" in s["counter"]
    lines = (out / "images" / "manifest.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["expected"] == 1 and len(lines) == 4
    assert (out / "grid.png").stat().st_size > 0 and "| expected count |" in (
        out / "report.md"
    ).read_text()


def test_images_made_elsewhere_are_scored_from_their_manifest(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    with open(folder / "manifest.jsonl", "w") as f:
        for i in range(8):
            image, _, n, obj = scene(i, size=32)
            Image.fromarray(image).save(folder / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "object": obj, "expected": n}) + "\n")
    s = cli(
        [
            "evaluate",
            "counting",
            "--images",
            folder,
            "--counter",
            "components",
            "--out",
            tmp_path / "out",
            "--json",
        ],
        capsys,
    )
    assert s["accuracy"] == 1.0 and s["images"] == 8 and s["by_variant"]["-"]["images"] == 8
    # a counter of one's own, by module:Class, with --threshold passed through
    s = cli(
        [
            "evaluate",
            "counting",
            "--images",
            folder,
            "--counter",
            "image_tiny:BrightBlobs",
            "--threshold",
            "0.3",
            "--out",
            tmp_path / "own",
            "--json",
        ],
        capsys,
    )
    assert s["counter"] == {"name": "bright-blobs", "threshold": 0.3}
    assert s["by_class"]["circle"]["accuracy"] == 1.0  # every blob is a circle to it


def test_detector_counts_cats_and_people_in_composed_photos():
    from tunelab.image.calibrate import compose
    from tunelab.image.detector import CALIBRATION, SSDMobileNet, model_files

    try:
        model_files()
    except Exception:  # noqa: BLE001
        pytest.skip("the SSD-MobileNet wheel is not installed")
    calibration = json.loads(CALIBRATION.read_text())
    detector = SSDMobileNet()
    assert detector.threshold == calibration["threshold"] and detector.record()["calibrated"]
    for obj in ("cat", "person"):  # seeds the calibration never saw
        hits = [count(detector.detect(compose(obj, n, seed=100)), obj) == n for n in (1, 2, 3, 4)]
        # four images: at most one more miss than the calibrated accuracy predicts
        assert sum(hits) >= 4 * calibration["by_class"][obj] - 1, (obj, hits)


def test_train_the_tiny_model_resume_it_then_generate(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "data": {"size": 16},
                "threads": 1,
                "model": {
                    "unet": {
                        "block_out_channels": [8, 16, 16],
                        "norm_num_groups": 4,
                        "attention_head_dim": 8,
                        "cross_attention_dim": 16,
                    },
                    "text": {"dim": 16, "layers": 1, "heads": 2},
                },
                "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3},
            }
        )
    )
    run = tmp_path / "run"
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the run's own setting (1) must not outlive it
    try:
        s = cli(["image", "train", "--config", config, "--out", run, "--json"], capsys)
        assert torch.get_num_threads() == 2 and s["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert s["steps"] == 2 and s["images"] == 8 and s["task"] == "image"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final"} <= {
        p.name for p in run.iterdir()
    }
    import shutil

    (run / "summary.json").unlink()  # as if killed after its last checkpoint (step 2)
    shutil.rmtree(run / "final")
    s = cli(["image", "train", "--resume", run, "--max-steps", "3", "--json"], capsys)
    assert s["steps"] == 3 and s["images"] == 12
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    side = cli(
        [
            "image",
            "generate",
            "--model",
            run / "final",
            "--prompt",
            "two circles",
            "--n",
            "1",
            "--steps",
            "2",
            "--out",
            tmp_path / "g",
            "--json",
        ],
        capsys,
    )
    assert side["size"] == 16 and side["model"]["kind"] == "tunelab-tiny"


def test_a_study_counts_with_the_report_section(models, tmp_path):
    from tunelab.study.report import write_report
    from tunelab.study.study import Study

    recipe = {
        "study": "count",
        "experiments": [
            {
                "name": "guidance",
                "task": "counting",
                "models": [str(models["tiny"])],
                "config": {
                    "counting": {
                        "counter": "components",
                        "numbers": [1, 2],
                        "images": 1,
                        "classes": ["circle"],
                        "steps": 2,
                        "variants": {"digit": "{digit} {object}"},
                    }
                },
                "methods": {"g1": {"guidance": 1.0}, "g3": {"guidance": 3.0}},
            }
        ],
    }
    results = Study(recipe, tmp_path / "s").run(isolate=False)
    assert [r["status"] for r in results["rows"]] == ["done", "done"]
    assert results["rows"][0]["metric"] == "accuracy"
    _, md = write_report(tmp_path / "s")
    text = md.read_text()
    assert "## Counting" in text and "n=2" in text and "counting-grid" in text
