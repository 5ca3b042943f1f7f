"""The study report: tables carry the measured numbers, plots are real PNGs, the page renders."""

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.study.report import write_report
from tunelab.study.results import group_rows

PNG = b"\x89PNG\r\n\x1a\n"
IMG = re.compile(r"<img src='data:image/png;base64,([^']*)' alt='([^']*)'>")


def curve(steps: int, start: float, val_key: str | None = None) -> list[dict]:
    """Training records every step and a validation record every 5 steps."""
    out = []
    for s in range(1, steps + 1):
        out.append({"step": s, "loss": start / s**0.3, "lr": 1e-4, "tokens_per_s": 900.0})
        if s % 5 == 0:
            val = {"step": s, "split": "val", "val_loss": start / s**0.2 + 0.1, "samples": ["x"]}
            if val_key:
                val[val_key] = min(1.0, 0.5 + s / 40)
            out.append(val)
    return out


def make_study(root: Path, rows: list[dict], metrics: dict, groups: bool = True) -> Path:
    """A study directory as the runner writes it: results.json and runs/<exp>/<cell>-s<seed>/."""
    study = root / "study"
    for r in rows:
        r.setdefault("dir", f"runs/{r['run']}")
        run_dir = study / r["dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        if r["run"] in metrics:
            lines = [json.dumps(m) for m in metrics[r["run"]]]
            (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        if r["status"] == "done":
            (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": r.get("wall_time_s")}))
    results = {"study": "tiny", "rows": rows}
    if groups:
        results["groups"] = group_rows(rows)
    (study / "results.json").write_text(json.dumps(results))
    return study


def row(run: str, task: str, method: str, seed: int = 0, status: str = "done", **fields) -> dict:
    model = fields.pop("model", "smollm2-135m-instruct")
    return {
        "experiment": run.split("/")[0],
        "run": run,
        "status": status,
        "error": None,
        "task": task,
        "model": model,
        "method": method,
        "data": "plots",
        "seed": seed,
        **fields,
    }


LM = {"total_params": 134_515_008, "metric": "final_val_loss"}
ROWS = [
    row("methods/lora-s0", "finetune", "lora", 0, trainable_params=460_800, wall_time_s=12.0,
        peak_memory_mb=900.0, tokens_per_s=850.0, value=2.1, final_val_loss=2.1,
        ppl_general_before=20.0, ppl_general_after=21.0, forgetting=0.05, **LM),
    row("methods/lora-s1", "finetune", "lora", 1, trainable_params=460_800, wall_time_s=13.0,
        peak_memory_mb=910.0, tokens_per_s=830.0, value=2.2, final_val_loss=2.2,
        ppl_general_before=20.0, ppl_general_after=21.0, forgetting=0.05, **LM),
    row("methods/full-s0", "finetune", "full", 0, trainable_params=134_515_008, wall_time_s=30.0,
        peak_memory_mb=2400.0, tokens_per_s=400.0, value=1.95, final_val_loss=1.95,
        ppl_general_before=20.0, ppl_general_after=22.4, forgetting=0.12, **LM),
    row("methods/freeze-s0", "finetune", "freeze", 0, status="failed",
        error="out of memory | at step 3"),
    row("sentiment/minilm-full-s0", "classify", "full", model="minilm-l6", metric="accuracy",
        value=0.85, accuracy=0.85, macro_f1=0.84, trainable_params=22_700_000,
        total_params=22_700_000, wall_time_s=8.0, peak_memory_mb=300.0),
    row("sentiment/prompt-0shot-s0", "icl", "prompt-0shot", metric="accuracy", value=0.62,
        accuracy=0.62, macro_f1=0.55, wall_time_s=3.0),
    row("dpo/dpo-s0", "align", "dpo", metric="preference_accuracy", value=0.75,
        preference_accuracy_before=0.5, preference_accuracy_after=0.75, wall_time_s=20.0,
        peak_memory_mb=1500.0, trainable_params=460_800, total_params=134_515_008),
]  # fmt: skip
METRICS = {
    "methods/lora-s0": curve(10, 3.0),
    "methods/lora-s1": curve(10, 3.1),
    "methods/full-s0": curve(10, 2.9),
    "sentiment/minilm-full-s0": curve(10, 0.7, "val_accuracy"),
    "dpo/dpo-s0": curve(10, 0.69, "val_reward_accuracy"),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str, str]:
    study = make_study(tmp_path_factory.mktemp("r"), [dict(r) for r in ROWS], METRICS)
    with open(study / "runs/methods/lora-s0/metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 1.')  # a run killed mid-write
    html_path, md_path = write_report(study)
    return study, html_path.read_text(), md_path.read_text()


def test_markdown_tables_carry_the_numbers(report):
    study, _, md = report
    assert "| lora | plots | 2 | final_val_loss | 2.15 ± 0.071 | – | 2.15 ± 0.071 |" in md
    assert "**1.95**" in md  # the best (lowest) validation loss of its experiment
    assert "**0.85**" in md and "0.62" in md and "0.84" in md
    assert "+5.0% ± 0.0%" in md and "+12.0%" in md  # forgetting
    assert "0.34% of 134,515,008" in md and "100.00% of 22,700,000" in md
    assert "12.5 ± 0.71" in md and "2,400" in md  # wall time, peak memory
    assert "| 0 (1 failed) |" in md and "| failed |" in md
    assert "out of memory \\| at step 3" in md  # the failed run, its error escaped
    assert "| dpo | preference agreement | 0.5 | 0.75 | +0.25 |" in md
    # The technique table: a fixed use case and only measured figures.
    lora = next(line for line in md.splitlines() if line.startswith("| methods | lora |"))
    assert lora.split(" | ")[3:] == [
        "cheap adaptation; a small adapter to ship",
        "wall s 12.5 ± 0.71; peak MB 905 ± 7.1; trainable 0.34% of 134,515,008",
        "forgetting +5.0% ± 0.0%; val loss 2.15 ± 0.071 |",
    ]
    assert "| small data; only the top blocks train | run failed | run failed |" in md
    assert "no training: zero-shot prompt" in md
    links = re.findall(r"!\[[^\]]+\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) == 6  # 3 loss figures, bars, scatter, preference
    for link in links:
        assert (study / link).read_bytes().startswith(PNG)


def test_html_is_self_contained_with_real_pngs(report):
    _, page, _ = report
    images = IMG.findall(page)
    assert len(images) == page.count("<img") == 6
    for data, alt in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG) and len(png) > 1000 and alt.strip()
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 0 and height > 0
    assert not re.search(r"(src|href)=['\"]?(https?:|//)|url\(|@import", page)
    assert "<b>1.95</b>" in page and "out of memory | at step 3" in page


def test_missing_data_gives_notes_not_errors(tmp_path):
    rows = [
        row("sentiment/prompt-0shot-s0", "icl", "prompt-0shot", metric="accuracy", value=0.6),
        row("sentiment/lora-s0", "classify", "lora", status="failed", error="boom"),
    ]
    study = make_study(tmp_path, rows, {}, groups=False)
    html_path, md_path = write_report(study)
    md = md_path.read_text()
    assert "no loss curves" in md and "No alignment run logged val_reward_accuracy." in md
    assert "No group has both a cost and a main metric." in md and "boom" in md
    assert html_path.read_text().count("<img") == 1  # the bar chart only
    assert [p.name for p in (study / "report_files").iterdir()] == ["metric-bars.png"]
    (study / "results.json").unlink()
    with pytest.raises(TunelabError, match="tunelab study"):
        write_report(study)


# Runs before the page's own content: records every script or resource error, and on load
# writes the images' decoded sizes into the DOM for --dump-dom to carry out.
PROBE = """<script>
window.__errors = [];
addEventListener('error', e => __errors.push(
  String(e.message || (e.target && e.target.outerHTML.slice(0, 80)))), true);
addEventListener('load', () => {
  const p = document.createElement('pre'); p.id = 'probe';
  p.textContent = JSON.stringify({errors: __errors, images: [...document.images].map(
    i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])});
  document.body.appendChild(p);
});
</script>"""


def chromium(tmp: Path, *args: str) -> str:
    cmd = [
        shutil.which("chromium"),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_page_renders_in_headless_chromium(report, tmp_path):
    if not shutil.which("chromium"):
        if os.environ.get("TUNELAB_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs it
            pytest.fail("chromium is not on PATH (apt-get install chromium)")
        pytest.skip("needs chromium: apt-get install chromium")
    study, page, _ = report
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    dom = chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S)
    assert found, "the page never fired its load event"
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["errors"] == []
    assert len(probe["images"]) == 6
    for alt, complete, width, height in probe["images"]:
        assert complete and width > 100 and height > 100, alt
    shot = study / "report-screenshot.png"  # kept beside the report for a human to look at
    page_uri = (study / "report.html").as_uri()
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3000", page_uri)
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 10_000
