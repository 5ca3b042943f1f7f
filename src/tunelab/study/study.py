"""A study: a grid of ordinary runs from one YAML recipe, and one table of what each cost and gained.

Recipe shape (see recipes/quickstart.yaml):
    study: name
    seeds: [0, 1]                  # every cell runs once per seed
    defaults: {train: {...}}       # run-config keys applied to every training run
    quick: {seeds: [0], defaults: {...}, experiments: {name: {...}}}   # merged with --quick
    experiments:
      - name: methods
        task: pretrain | finetune | classify | align | icl | perplexity | instructions
        config: {...}              # run-config keys for this experiment
        methods: {lora: {name: lora, r: 8}, full: {}}     # label -> method options
        models: [smollm2-135m-instruct]
        runs: [{name, model, method, config}]             # explicit cells (instead of the grid)
        prompts: {default: {}, plain: {format: plain}}     # icl: a prompt sweep, name -> prompt
        shots: [0, 4]                                      # icl: shot counts of the sweep
A prompt sweep's cells are models x prompts x shots (each a method `PROMPT-Kshot`); its seeds
draw the demonstrations, so the spread over seeds is the sensitivity to which examples are shown
(each k-shot cell averages icl.draws draws of its seed, 3 by default; `draws: 1` for one).
Strings may name `${demo}` (the demo data, written on first use), `${study}`, and
`${run:EXPERIMENT/CELL}` (that cell's final model, same seed).
Each cell is a run directory under runs/; finished ones are skipped, interrupted ones resume,
a failed one is recorded with its error and the study goes on.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import traceback
from pathlib import Path

import yaml

from tunelab.errors import ConfigError, TunelabError, closest
from tunelab.files import read_yaml
from tunelab.paths import slug

log = logging.getLogger("tunelab")
TASKS = (
    "pretrain",
    "finetune",
    "classify",
    "align",
    "icl",
    "perplexity",
    "instructions",
    "image",
    "counting",
)
EVALUATIONS = ("icl", "perplexity", "instructions", "counting")  # measure a model, no training
EXPERIMENT_KEYS = (
    "name",
    "task",
    "config",
    "methods",
    "models",
    "runs",
    "seeds",
    "prompts",
    "shots",
)


def merge(base: dict, over: dict) -> dict:
    """Deep merge: dicts merge key by key, everything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, quick: bool = False) -> dict:
    """The recipe with `quick:` merged in when asked; unknown keys name the closest valid one."""
    path = Path(path)
    recipe = read_yaml(path, "recipe") or {}
    allowed = ("study", "description", "seeds", "defaults", "quick", "experiments")
    for key in recipe:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown recipe key {key!r}{closest(key, allowed)}")
    if quick and recipe.get("quick"):
        q = recipe["quick"]
        recipe["seeds"] = q.get("seeds", recipe.get("seeds"))
        recipe["defaults"] = merge(recipe.get("defaults") or {}, q.get("defaults") or {})
        for e in recipe.get("experiments", []):
            e.update(merge(e, (q.get("experiments") or {}).get(e.get("name"), {})))
        recipe["experiments"] = [e for e in recipe["experiments"] if not e.get("skip")]
    for i, e in enumerate(recipe.get("experiments") or []):
        where = f"{path}: experiments[{i}]"
        for key in e:
            if key not in EXPERIMENT_KEYS + ("skip",):
                raise ConfigError(f"{where}: unknown key {key!r}{closest(key, EXPERIMENT_KEYS)}")
        if e.get("task") not in TASKS:
            raise ConfigError(
                f"{where}: task {e.get('task')!r}; expected one of {', '.join(TASKS)}"
            )
        if not e.get("name"):
            raise ConfigError(f"{where}: every experiment needs a name")
        if (e.get("prompts") or e.get("shots")) and e["task"] != "icl":
            raise ConfigError(f"{where}: prompts and shots are for task icl (a prompt sweep)")
    if not recipe.get("experiments"):
        raise ConfigError(f"{path}: no experiments")
    return recipe


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_name(name, what: str) -> str:
    """A recipe name that becomes a folder: a slug, no separators, no `..`."""
    text = str(name)
    if not NAME.fullmatch(text) or ".." in text:
        raise ConfigError(
            f"{what} {text!r}: use letters, digits, '.', '_', '-' and '+' only "
            "(it names a folder; no '/' or '..')"
        )
    return text


def cells(recipe: dict) -> list[dict]:
    """Every (experiment, cell, seed) of the recipe, in order."""
    out = []
    for e in recipe["experiments"]:
        check_name(e["name"], "experiment name")
        methods = sweep_methods(e) or e.get("methods") or {"full": {}}
        runs = e.get("runs") or [
            {"model": m, "method": label} for m in e.get("models") or [None] for label in methods
        ]
        for run in runs:
            label, run_config = run.get("method", "full"), dict(run.get("config") or {})
            if isinstance(label, dict):  # an inline method, e.g. {shots: 4} for prompting
                method = label
                label = f"{label['shots']}-shot" if "shots" in label else label.get("name", "full")
            else:
                method = run_config.pop("method", None) or methods.get(label, {"name": label})
            name = run.get("name") or "-".join(
                x for x in (slug(run["model"]) if run.get("model") else "", str(label)) if x
            )
            check_name(name, f"experiment {e['name']}: run name")
            seeds = e.get("seeds") or recipe.get("seeds") or [0]
            if e["task"] == "icl" and method and method.get("shots") == 0:
                seeds = seeds[:1]  # no demonstrations: every seed would score the same
            for seed in seeds:
                data = merge(e.get("config") or {}, run_config).get("data") or {}
                out.append(
                    {
                        "experiment": e["name"],
                        "task": e["task"],
                        "cell": name,
                        "data": Path(data["path"]).stem if data.get("path") else "",
                        "model": run.get("model"),
                        "method_label": str(label),
                        "method": dict(method or {}),
                        "seed": seed,
                        "config": merge(e.get("config") or {}, run_config),
                        "run": f"{e['name']}/{name}-s{seed}",
                    }
                )
    return out


def sweep_methods(e: dict) -> dict | None:
    """A prompt sweep's methods: 'PROMPT-Kshot' -> {prompt, shots, ...the prompt's keys}."""
    if not (e.get("prompts") or e.get("shots")):
        return None
    prompts = e.get("prompts") or {"default": {}}
    if isinstance(prompts, list):  # [{name: x, format: ...}, ...]
        prompts = {
            p.get("name", f"prompt{i}"): {k: v for k, v in p.items() if k != "name"}
            for i, p in enumerate(prompts)
        }
    shots = e.get("shots") or [0]
    where = f"experiment {e['name']}"
    if not isinstance(shots, list) or not all(isinstance(k, int) and k >= 0 for k in shots):
        raise ConfigError(f"{where}: shots {shots!r}: expected a list of counts >= 0, e.g. [0, 4]")
    out = {}
    for name, options in prompts.items():
        check_name(name, f"{where}: prompt name")
        if not isinstance(options, dict):
            raise ConfigError(
                f"{where}: prompt {name!r}: expected keys (format, template, "
                f"pre, post, instruction, label_words), got {options!r}"
            )
        for k in shots:
            out[f"{name}-{k}shot"] = {**options, "prompt": name, "shots": k}
    return out


class Study:
    """Runs the cells of a recipe into a study directory and collects the results table."""

    def __init__(self, recipe: dict, out: str | Path):
        self.recipe, self.out = recipe, Path(out)
        self.cells = cells(recipe)
        seen: set[str] = set()
        for cell in self.cells:  # a reference must name a cell that runs earlier
            for ref in re.findall(
                r"\$\{run:([^}]+)\}", json.dumps([cell["model"], cell["config"]])
            ):
                if ref not in seen:
                    raise ConfigError(
                        f"{cell['run']}: ${{run:{ref}}} names no earlier cell"
                        f"{closest(ref, sorted(seen))}"
                    )
            seen.add(f"{cell['experiment']}/{cell['cell']}")

    def resolve(self, value, seed: int):
        """Fill ${demo}, ${study} and ${run:EXP/CELL} in strings, recursively."""
        if isinstance(value, dict):
            return {k: self.resolve(v, seed) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, seed) for v in value]
        if not isinstance(value, str):
            return value
        if "${demo}" in value:
            value = value.replace("${demo}", str(self.demo_dir()))
        value = value.replace("${study}", str(self.out))

        def run_ref(m: re.Match) -> str:
            exp_cell = m.group(1)
            target = self.out / "runs" / f"{exp_cell}-s{seed}"
            if not target.exists():  # that experiment ran fewer seeds: take its first
                found = sorted(target.parent.glob(f"{Path(exp_cell).name}-s*"))
                target = found[0] if found else target
            if not (target / "final").exists():
                raise ConfigError(
                    f"${{run:{exp_cell}}}: {target} has no final model (did it fail?)"
                )
            return str(target / "final")

        return re.sub(r"\$\{run:([^}]+)\}", run_ref, value)

    def demo_dir(self) -> Path:
        from tunelab.demo.generate import FILES, write_demo_data

        path = self.out / "data"
        if not all((path / name).exists() for name in FILES):  # a study begun before a file
            write_demo_data(path)  # was added gets it (the others are rewritten as they were)
        return path

    def run(self, isolate: bool = True) -> dict:
        """Run every unfinished cell; isolate=True runs each in a fresh process, so its peak
        memory is its own and a crash (or the OOM killer) takes only that cell."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe, sort_keys=False))
        for i, cell in enumerate(self.cells, 1):
            run_dir = self.out / "runs" / cell["run"]
            tag = f"[{i}/{len(self.cells)}] {cell['run']}"
            if (run_dir / "summary.json").exists():
                log.info("%s: done already", tag)
                continue
            log.info("%s ...", tag)
            t0 = time.perf_counter()
            (run_dir / "error.json").unlink(missing_ok=True)
            if isolate:
                _in_child(self, i - 1, run_dir)
            else:
                _guarded(self, cell, run_dir)
            if (run_dir / "error.json").exists():
                error = json.loads((run_dir / "error.json").read_text())["error"]
                log.error("%s failed: %s", tag, error)
            else:
                log.info("%s: done in %.0f s", tag, time.perf_counter() - t0)
        return self.collect()

    def collect(self) -> dict:
        from tunelab.study.results import group_rows, row_of, write_results

        rows = [row_of(cell, self.out / "runs" / cell["run"]) for cell in self.cells]
        results = {
            "study": self.recipe.get("study", self.out.name),
            "rows": rows,
            "groups": group_rows(rows),
        }
        write_results(self.out, results)
        return results


def _guarded(study: Study, cell: dict, run_dir: Path) -> None:
    """Run a cell; a failure is written to error.json (one line + traceback), never raised."""
    try:
        run_cell(study, cell, run_dir)
    except Exception as e:  # noqa: BLE001 - a failed cell must not stop the study
        run_dir.mkdir(parents=True, exist_ok=True)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, TunelabError):
            message = f"{type(e).__name__}: {message}"
        (run_dir / "error.json").write_text(
            json.dumps({"error": message, "traceback": traceback.format_exc()}, indent=2)
        )


def _child(recipe: dict, out: str, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = Study(recipe, out)
    cell = study.cells[index]
    _guarded(study, cell, study.out / "runs" / cell["run"])


def _in_child(study: Study, index: int, run_dir: Path) -> None:
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(
        target=_child, args=(study.recipe, str(study.out), index)
    )
    child.start()
    try:
        child.join()
    except KeyboardInterrupt:
        child.terminate()
        child.join()
        raise
    if child.exitcode and not (run_dir / "error.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        why = "killed (out of memory?)" if child.exitcode < 0 else "exited"
        (run_dir / "error.json").write_text(
            json.dumps({"error": f"the run's process {why} with code {child.exitcode}"})
        )


def run_cell(study: Study, cell: dict, run_dir: Path) -> dict:
    """One cell: a training run through the usual runner, or an evaluation-only task."""
    seed = cell["seed"]
    config = study.resolve(merge(study.recipe.get("defaults") or {}, cell["config"]), seed)
    model = study.resolve(cell["model"], seed) if cell["model"] else config.get("model")
    if cell["task"] in EVALUATIONS:
        from tunelab.study.evaluations import run_evaluation

        return run_evaluation(cell["task"], model, config, cell["method"], seed, run_dir)
    if cell["task"] == "image":  # the tiny text-to-image model, from scratch (train/image.py)
        from tunelab.train.image import load_image_config, run_image_training

        resume = (run_dir / "config.yaml").exists()  # an interrupted cell continues
        config = merge(config, {"out": str(run_dir), "resume": resume, "train": {"seed": seed}})
        return run_image_training(load_image_config(None, _flatten(config)))
    from tunelab.train.config import load_config
    from tunelab.train.tasks import run_task

    resume = (run_dir / "config.yaml").exists()
    config = merge(
        config,
        {
            "task": cell["task"],
            "out": str(run_dir),
            "resume": resume,
            "method": cell["method"],
            "train": {"seed": seed},
        },
    )
    if model:
        config["model"] = model
    cfg = load_config(None, _flatten(config))
    return run_task(cfg)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; method stays one dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "method" and not prefix.startswith("method"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
