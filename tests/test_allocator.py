"""The allocator settings: large tensors allocated again each step reuse memory, no page faults."""

import os
import subprocess
import sys

import pytest

from tunelab.runtime import allocator

CODE = """
import resource, torch
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.objectives import causal_lm
torch.manual_seed(0)
model = CausalLM(ModelConfig(vocab_size=16384, n_layer=2, n_head=4, d_model=256, d_ff=512))
ids = torch.randint(0, 16384, (4, 256))
batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
def step():  # 64 MB of logits and their gradient, as in a language-model step
    causal_lm(model, batch)[0].backward()
    model.zero_grad(set_to_none=True)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):  # one step now and then faults a block in again: count a steady stretch
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env: dict) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in allocator.MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        env={**clean, **env},
        check=True,
    ).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_with_the_settings_freed_large_blocks_are_reused_without_page_faults():
    default, kept = faults({}), faults(allocator.MALLOC_ENV)
    assert default > 4 * 16_384  # each step's logits and gradient fault their 4 KiB pages in
    assert kept < default / 4  # 0 to 33k seen over 4 steps, against ~270k


def test_the_command_restarts_once_with_the_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for k in allocator.MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("TUNELAB_MALLOC", raising=False)
    allocator.reexec(["models", "--json"])
    ((exe, argv, env),) = calls
    assert argv == [sys.executable, "-m", "tunelab", "models", "--json"]
    assert all(env[k] == v for k, v in allocator.MALLOC_ENV.items())
    for k, v in allocator.MALLOC_ENV.items():  # the restarted process does not restart again
        monkeypatch.setenv(k, v)
    allocator.reexec(["models"])
    monkeypatch.setenv("TUNELAB_MALLOC", "0")
    for k in allocator.MALLOC_ENV:
        monkeypatch.delenv(k)
    allocator.reexec(["models"])  # turned off
    assert len(calls) == 1


def test_the_command_restarts_after_parsing_and_not_for_help_or_system(monkeypatch, tmp_path):
    from tunelab.cli import main
    from tunelab.train.loop import Trainer

    calls = []

    def execve(*a):  # stands for the restart: the command would run again from the start
        calls.append(a[1][3:])
        raise SystemExit(0)

    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for k in [*allocator.MALLOC_ENV, "TUNELAB_MALLOC"]:
        monkeypatch.delenv(k, raising=False)
    for argv in (["--help"], ["runtime", "--help"], ["finetune", "--nope", "1"]):
        with pytest.raises(SystemExit):
            main(argv, restart=True)
    assert calls == []  # --help and usage errors print and exit in this process
    config = tmp_path / "run.yaml"
    config.write_text("runtime:\n  allocator: system\n")
    # the run goes on in this process and stops at its option check, before it loads anything
    assert main(["finetune", "--config", str(config), "--max-steps", "0"], restart=True) == 2
    assert (
        main(["finetune", "--runtime.allocator", "system", "--max-steps", "0"], restart=True) == 2
    )
    assert calls == []  # runtime.allocator system: glibc's defaults, no restart
    with pytest.raises(SystemExit):
        main(["models", "--json"], restart=True)
    assert calls == [["models", "--json"]]
    assert (
        "keep_freed_memory" not in Trainer.__init__.__code__.co_names
    )  # the command's, not the loop's


def test_auto_keeps_freed_memory_below_a_billion_parameters_only():
    assert allocator.for_model("auto", None) == "keep"  # unknown size: the small-model setting
    assert allocator.for_model("auto", allocator.LARGE - 1) == "keep"
    assert allocator.for_model("auto", allocator.LARGE) == "system"
    assert allocator.for_model("keep", 10 * allocator.LARGE) == "keep"  # asked for: as asked
    assert allocator.for_model("system", 1) == "system"


def test_the_command_decides_auto_by_the_size_of_the_model_it_names(monkeypatch, tmp_path):
    import json

    from tunelab.cli import main

    calls = []

    def execve(*a):
        calls.append(a[1][3:])
        raise SystemExit(0)

    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for k in [*allocator.MALLOC_ENV, "TUNELAB_MALLOC"]:
        monkeypatch.delenv(k, raising=False)
    hf = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=32000,
        intermediate_size=5632,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    for name, (width, layers) in {"big": (2048, 22), "small": (256, 2)}.items():
        (tmp_path / name).mkdir()
        cfg = dict(hf, hidden_size=width, num_hidden_layers=layers)
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    big, small = str(tmp_path / "big"), str(tmp_path / "small")
    # 1.1B parameters from the config alone (no weights needed): glibc's defaults, no restart
    assert main(["finetune", "--model", big, "--max-steps", "0"], restart=True) == 2
    assert calls == []
    recipe = tmp_path / "study.yaml"
    recipe.write_text(
        f"study: s\nexperiments:\n  - name: a\n    task: pretrain\n    models: [{big}]\n"
    )
    main(["study", str(recipe), "--out", str(tmp_path / "s")], restart=True)
    assert calls == []  # a study sized by the largest model of its recipe
    with pytest.raises(SystemExit):
        main(["finetune", "--model", small, "--max-steps", "0"], restart=True)
    assert calls and calls[-1][:3] == ["finetune", "--model", small]
