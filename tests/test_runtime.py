"""The runtime layer (runtime/): kernels chosen by measurement and cached per machine, forced
choices, what a run records. The timer is faked: no test here depends on this machine's speed."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from tunelab.cli import main
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.runtime import candidates, choose, prepare_runtime, resolve
from tunelab.runtime.kernels import FastLinear, onednn_works

TINY = {"decode": [(8, 16, 1), (8, 16, 8)], "train": [(8, 16, 32)]}


def fake_machine(monkeypatch, tmp_path, speeds: dict) -> list:
    """Each candidate takes speeds[candidate] seconds (default 1.0); returns the timer's calls."""
    calls = []
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TUNELAB_ONEDNN", raising=False)
    monkeypatch.setattr(choose, "SHAPES", TINY)
    monkeypatch.setattr(choose.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine
    monkeypatch.setattr(
        choose, "timer", lambda fn, cand, cls: calls.append(cls) or speeds.get(cand, 1.0)
    )
    return calls


needs_onednn = pytest.mark.skipif(not onednn_works(torch.float32), reason="no oneDNN linear here")


@needs_onednn
def test_auto_keeps_torch_where_onednn_loses(monkeypatch, tmp_path):
    fake_machine(
        monkeypatch, tmp_path, {"torch": 1.0, "onednn": 1.3, "packed": 1.2, "packed+fused": 1.05}
    )
    assert set(resolve("auto").kernels.values()) == {"torch"}


@needs_onednn
def test_auto_takes_onednn_where_it_wins_by_the_margin(monkeypatch, tmp_path):
    fake_machine(
        monkeypatch, tmp_path, {"torch": 1.0, "onednn": 0.5, "packed": 0.4, "packed+fused": 0.3}
    )
    kernels = resolve("auto").kernels
    assert kernels["train-fp32"] == "onednn" and kernels["decode-fp32"] == "packed+fused"


def test_a_win_below_the_margin_or_a_loss_on_one_shape_is_not_taken():
    def rows(cls, times):  # {shape: {candidate: ms}}
        return [
            dict(cls=cls, shape=s, candidate=c, ms=ms)
            for s, t in times.items()
            for c, ms in t.items()
        ]

    close = rows("train-fp32", {"a": {"torch": 1.0, "onednn": 0.97}})  # 3% faster: noise
    mixed = rows(
        "decode-fp32", {"a": {"torch": 1.0, "packed": 0.2}, "b": {"torch": 1.0, "packed": 1.05}}
    )
    decode = rows("decode-bf16", {"a": {"torch": 1.0, "packed": 0.93}})  # 7.5%: noise here
    choice = choose.decide(close + mixed + decode)
    assert choice["train-fp32"] == "torch" and choice["decode-fp32"] == "torch"
    assert choice["decode-bf16"] == "torch"
    # training products are timed over long calls: a 6% win is taken there, not when decoding
    six = {"a": {"torch": 1.0, "onednn+mm": 0.94}}
    assert choose.decide(rows("train-fp32", six))["train-fp32"] == "onednn+mm"
    assert choose.decide(rows("decode-fp32", six))["decode-fp32"] == "torch"
    assert (
        choose.decide(rows("train-fp32", {"a": {"torch": 1.0, "onednn": 0.8}}))["train-fp32"]
        == "onednn"
    )
    # a tie lost by 1% on one shape (timing noise) does not veto the wins elsewhere; 5% does
    tie = {"a": {"torch": 1.0, "onednn+mm": 1.01}, "b": {"torch": 1.0, "onednn+mm": 0.8}}
    assert choose.decide(rows("train-fp32", tie))["train-fp32"] == "onednn+mm"
    tie["a"]["onednn+mm"] = 1.05
    assert choose.decide(rows("train-fp32", tie))["train-fp32"] == "torch"


def test_the_table_is_measured_once_per_machine_and_cached(monkeypatch, tmp_path):
    calls = fake_machine(monkeypatch, tmp_path, {"onednn": 0.5})
    first = choose.measured()
    n = len(calls)
    assert n and choose.cache_path().exists()
    assert choose.measured() == first and len(calls) == n  # read back, not measured again
    assert resolve("auto").kernels == first["choice"] and len(calls) == n
    other = {**choose.machine(), "cpu": "another CPU"}  # another machine has its own file
    assert choose.cache_path(other) != choose.cache_path()
    monkeypatch.setattr(choose, "machine", lambda: other)
    choose.measured()
    assert len(calls) == 2 * n
    main(["runtime", "--rerun", "--json"])
    assert len(calls) == 3 * n
    # a table an older tunelab measured otherwise (other shapes or margins) is measured again
    monkeypatch.setattr(choose, "MARGINS", {"train": 1.5})
    choose.measured()
    assert len(calls) == 4 * n


def test_a_table_measured_on_a_busy_machine_is_measured_again_once_it_is_quiet(
    monkeypatch, tmp_path
):
    calls = fake_machine(monkeypatch, tmp_path, {"onednn": 0.5})
    cores = choose.machine()["cores"] or 1
    load = [cores + 3.0]
    monkeypatch.setattr(choose.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    busy = choose.measured()
    n = len(calls)
    assert busy["load"] > cores
    assert choose.measured() == busy and len(calls) == n  # still busy: the guess serves
    load[0] = 0.1
    quiet = choose.measured()
    assert len(calls) == 2 * n and quiet["load"] == 0.1  # quiet now: measured again
    load[0] = cores + 3.0
    assert choose.measured() == quiet and len(calls) == 2 * n  # a quiet table is kept


def test_the_runtime_command_shows_the_table(monkeypatch, tmp_path, capsys):
    fake_machine(monkeypatch, tmp_path, {"onednn": 0.5})
    assert main(["runtime"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "train-fp32" in out and "chosen (*)" in out
    assert main(["runtime", "--json", "--linear", "torch"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (
        got["resolved"]["kernels"]["train-fp32"] == "torch" and got["machine"] == choose.machine()
    )


def test_forced_choices_and_overrides(monkeypatch, tmp_path):
    calls = fake_machine(monkeypatch, tmp_path, {})
    model = CausalLM(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32))
    rt = prepare_runtime(model, SimpleNamespace(linear="torch", attention="mask"))
    assert set(rt.kernels.values()) == {"torch"} and not calls  # forced: nothing measured
    assert isinstance(model.lm_head, FastLinear) and model.transformer.attention_backend == "mask"
    assert rt.record(model)["attention_backend"] == "mask"
    rt = prepare_runtime(model, SimpleNamespace(linear="onednn"))
    want = "onednn" if onednn_works(torch.float32) else "torch"
    assert rt.kernels["train-fp32"] == model.lm_head.choice["train-fp32"] == want
    monkeypatch.setenv("TUNELAB_VARLEN", "rows")
    monkeypatch.setenv("TUNELAB_MALLOC", "0")
    rt = resolve("torch", "keep", "mask")
    assert rt.attention == "rows" and rt.allocator == "system"
    with pytest.raises(Exception, match="runtime.linear 'fast'"):
        resolve("fast")


def test_a_run_records_its_runtime(monkeypatch, tmp_path, capsys):
    from tunelab.tokenizer.bpe import BPETokenizer

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    words = "the a film plot hero city storm love ship night".split()
    text = [" ".join(words[(i * 7 + j) % 10] for j in range(8)) + "." for i in range(40)]
    BPETokenizer.train(text, vocab_size=300, special_tokens=["<|endoftext|>"]).save(
        tmp_path / "tok"
    )
    (tmp_path / "corpus.txt").write_text("\n\n".join(text))
    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--arch",
        "gpt2-tiny",
        "--tokenizer",
        str(tmp_path / "tok"),
        "--data",
        str(tmp_path / "corpus.txt"),
        "--out",
        str(out),
        "--seq-len",
        "24",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--runtime.linear",
        "torch",
        "--runtime.attention",
        "mask",
        "--json",
    ]
    monkeypatch.delenv("TUNELAB_ONEDNN", raising=False)
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    rt = summary["runtime"]
    assert rt["linear"] == "torch" and set(rt["kernels"].values()) == {"torch"}
    assert (
        rt["attention"] == "mask"
        and rt["attention_backend"] == "mask"
        and rt["allocator"] == "auto"
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["runtime"] == {"linear": "torch", "allocator": "auto", "attention": "mask"}


def test_nf4_dequantization_threads_follow_the_measured_table(monkeypatch, tmp_path):
    """dequant-nf4 is measured like the linear kernels (one thread against torch's) and a
    prepared model's NF4 layers take the winner; forced choices keep torch's threads."""
    from tunelab.adapt.quantize import quantize

    calls = fake_machine(monkeypatch, tmp_path, {"one-thread": 0.5})
    monkeypatch.setattr(choose, "SHAPES", {**TINY, "dequant": [(64, 32, 0)]})
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=64, d_ff=128)
    model = quantize(CausalLM(cfg), "nf4")
    rt = prepare_runtime(model, SimpleNamespace(linear="auto"))
    layers = [m for m in model.modules() if hasattr(m, "dequant_threads")]
    assert "dequant-nf4" in calls and rt.kernels["dequant-nf4"] == "one-thread"
    assert layers and all(m.dequant_threads == 1 for m in layers)
    prepare_runtime(model, SimpleNamespace(linear="torch"))
    assert all(m.dequant_threads is None for m in layers)


def test_one_row_and_batch_decoding_are_chosen_apart():
    """Plain oneDNN faster at 1 row, the fused reordered weights at 8 (as on 2 EPYC vCPUs):
    each batch size gets its winner, and a layer asks for the one of the rows it decodes;
    a table from before the split (no '/1' key) serves both."""
    from tunelab.runtime.kernels import FastLinear

    times = {
        "576x1536, 1 row (pair)": {"torch": 1.0, "onednn": 0.65, "packed+fused": 0.85},
        "4096x14336, 1 row (pair)": {"torch": 1.0, "onednn": 0.64, "packed+fused": 0.62},
        "576x1536, 8 rows (pair)": {"torch": 1.0, "onednn": 0.72, "packed+fused": 0.54},
        "4096x14336, 8 rows (pair)": {"torch": 1.0, "onednn": 0.32, "packed+fused": 0.20},
    }
    rows = [
        dict(cls="decode-fp32", shape=s, candidate=c, ms=ms)
        for s, t in times.items()
        for c, ms in t.items()
    ]
    choice = choose.decide(rows)
    assert choice["decode-fp32/1"] == "onednn" and choice["decode-fp32"] == "packed+fused"
    assert set(choice) == set(choose.KEYS)
    layer = FastLinear.of(torch.nn.Linear(4, 4), choice)
    assert layer.kernel(torch.float32, "decode", rows=1) == "onednn"
    assert layer.kernel(torch.float32, "decode", rows=8) == "packed+fused"
    assert layer.kernel(torch.float32, "decode") == "packed+fused"  # the prefill's rows
    old = FastLinear.of(torch.nn.Linear(4, 4), {"decode-fp32": "packed"})
    assert old.kernel(torch.float32, "decode", rows=1) == "packed"
    table = choose.format_table(
        dict(
            machine=choose.machine(), measured="now", seconds=1, load=0.0, rows=rows, choice=choice
        )
    )
    marked = [line.split()[-4] for line in table.splitlines() if line.endswith(" *")]
    assert marked == ["onednn", "onednn", "packed+fused", "packed+fused"]


@needs_onednn
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_candidates_time_the_same_products(rows, monkeypatch):
    """Every decode candidate's timed call computes the products torch's does: SmolLM2's whole
    blocks (q/k/v, o, gate/up, down; joined where "+fused") and the 7B-sized pair alike."""
    monkeypatch.setattr(candidates, "BLOCK_LAYERS", 2)
    for k, n in ((576, 1536), (64, 96)):  # the block candidates.DECODE_BLOCKS names, and a pair
        calls = candidates.decode_calls(k, n, rows, torch.float32, choose.CANDIDATES["decode"])
        assert set(calls) == set(choose.CANDIDATES["decode"])
        want = calls["torch"]()
        assert len(want) == (7 * 2 if (k, n) in candidates.DECODE_BLOCKS else 2)
        for name, fn in calls.items():
            got = fn()
            assert [y.shape for y in got] == [y.shape for y in want], name
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3, msg=name)
