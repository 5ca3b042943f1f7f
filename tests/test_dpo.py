"""Preference alignment: losses against TRL, pair scoring, references, agreement, the CLI."""

import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tunelab.adapt import apply_method
from tunelab.cli import main
from tunelab.data import load_records
from tunelab.data.preference import collate_pairs, pair_logps
from tunelab.errors import DataError
from tunelab.model.checkpoint import save_model_dir
from tunelab.model.config import ModelConfig, preset
from tunelab.model.heads import build_model
from tunelab.tokenizer.bpe import BPETokenizer
from tunelab.tokenizer.tokenizer import Tokenizer
from tunelab.train.align import AlignTask
from tunelab.train.config import load_config
from tunelab.train.objectives import preference_loss
from tunelab.train.pairs import encode_pairs, split_prompt
from tunelab.train.reference import REFERENCE_FILE, cached_reference, live_reference
from tunelab.train.run import init_weights, run_training

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences"
WORDS = "the a film plot hero villain city storm love war ship island night river king".split()
GOOD, BAD = "hero king ship .", "storm war night ."


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    saved = os.environ.get("TUNELAB_CACHE")
    os.environ["TUNELAB_CACHE"] = str(root / "cache")
    rng = random.Random(0)
    tok = BPETokenizer.train([_words(rng, 12) + "." for _ in range(200)], vocab_size=300,
                             special_tokens=["<|endoftext|>"])  # fmt: skip
    tok.save(root / "tok")
    (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tokenizer = Tokenizer.from_dir(root / "tok")
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                 d_model=64, d_ff=128, max_seq_len=256, eos_token_id=tokenizer.eos_id)  # fmt: skip
    model = build_model(cfg)
    init_weights(model)
    save_model_dir(model, tokenizer, root / "base")
    # Learnable preference: the chosen answer always ends with GOOD, the rejected with BAD.
    with open(root / "prefs.jsonl", "w") as f:
        for i in range(80):
            head = _words(rng, rng.randint(1, 4))
            f.write(json.dumps({"prompt": f"{_words(rng, 4)} {i}?", "chosen": f" {head} {GOOD}",
                                "rejected": f" {head} {BAD}"}) + "\n")  # fmt: skip
    yield root
    if saved is None:
        os.environ.pop("TUNELAB_CACHE")
    else:
        os.environ["TUNELAB_CACHE"] = saved


def align_cfg(setup, out, **over):
    base = {"task": "align", "model": str(setup / "base"), "data.path": str(setup / "prefs.jsonl"),
            "out": str(out), "train.seq_len": 64, "train.batch_size": 4, "train.lr": 1e-3,
            "train.max_steps": 3, "train.warmup_steps": 0, "train.device": "cpu",
            "data.val_fraction": 0.2}  # fmt: skip
    return load_config(None, {**base, **over})


# ---- losses: TRL's documented formulas, written out, on fresh random log-probs ----------------


def _pairs(seed: int, b: int = 8):
    """Summed response log-probs (policy, reference; chosen row 0, rejected row 1) and
    response lengths for b pairs; margins reach both sides of the hinge's kink."""
    g = torch.Generator().manual_seed(seed)
    policy = (-30 * torch.rand(2, b, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -30 * torch.rand(2, b, generator=g, dtype=torch.float64)
    return policy, ref, torch.randint(1, 30, (2, b), generator=g)


def _documented(name, beta, eps, policy, ref, tokens):
    """TRL's DPO losses as its documentation states them, per pair. With h the log-ratio
    margin (pc - rc) - (pr - rr): sigmoid -logsigmoid(beta h), with label smoothing eps the
    conservative -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h); hinge relu(1 - beta h);
    IPO (h' - 1/(2 beta))^2, h' from log-probs averaged over each response's tokens."""
    (pc, pr), (rc, rr) = policy, ref
    if name == "ipo":
        h = (pc - rc) / tokens[0] - (pr - rr) / tokens[1]
        return (h - 1 / (2 * beta)) ** 2
    h = (pc - rc) - (pr - rr)
    if name == "hinge":
        return torch.relu(1 - beta * h)
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _ours(name, beta, eps, policy, ref, tokens):
    return preference_loss(name, policy[0], policy[1], ref[0], ref[1], beta=beta,
                           label_smoothing=eps, chosen_tokens=tokens[0],
                           rejected_tokens=tokens[1])  # fmt: skip


LOSSES = [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("name,eps", LOSSES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_and_gradients_match_trls_documented_formulas(name, eps, beta):
    policy, ref, tokens = _pairs(seed=LOSSES.index((name, eps)) + int(beta * 10))
    ours, theirs = (f(name, beta, eps, policy, ref, tokens) for f in (_ours, _documented))
    assert ours.shape == theirs.shape == (8,)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    if name == "hinge":  # both sides of the kink: some pairs past the margin, some not
        assert 0 < int((theirs == 0).sum()) < len(theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), policy)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), policy)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,eps", LOSSES)
def test_losses_match_trls_public_cpo_loss_fed_log_ratios(name, eps):
    """CPOTrainer.cpo_loss is DPO without a reference: given the log-ratios instead of the
    log-probs, its sigmoid (with label smoothing), hinge and IPO losses are DPO's."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    beta = 0.3
    policy, ref, tokens = _pairs(seed=10 + LOSSES.index((name, eps)))
    chosen, rejected = policy[0] - ref[0], policy[1] - ref[1]
    if name == "ipo":  # TRL's DPO averages IPO's log-probs over tokens; CPO leaves that to us
        chosen, rejected = chosen / tokens[0], rejected / tokens[1]
    trainer = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"), beta=beta,
                              loss_type={"dpo": "sigmoid"}.get(name, name), label_smoothing=eps)  # fmt: skip
    theirs = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)[0]
    assert torch.allclose(_ours(name, beta, eps, policy, ref, tokens), theirs, rtol=1e-12, atol=0)


# ---- scoring pairs: one row per pair equals scoring each sequence alone ----------------------


FAMILIES = {
    "llama": dict(family="llama", n_kv_head=2),
    "gpt2": dict(family="gpt2", pos="learned", norm="layernorm", mlp="gelu", act="gelu_tanh",
                 qkv_bias=True, tie_embeddings=True),
    "mistral": dict(family="mistral", n_kv_head=2, sliding_window=5),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pair_logps_equal_hand_computation(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, d_ff=64,
                                    max_seq_len=64, **FAMILIES[family])).eval()  # fmt: skip
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt": ids(p), "chosen": ids(c), "rejected": ids(r)}
             for p, c, r in ((5, 3, 6), (1, 4, 1), (9, 2, 2))]  # fmt: skip
    with torch.no_grad():
        chosen, rejected = pair_logps(model, collate_pairs(pairs, pad_id=0))
        for i, pair in enumerate(pairs):
            for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
                seq = pair["prompt"] + pair[side]
                logp = torch.log_softmax(model(torch.tensor([seq])).float(), -1)[0]
                # every response token, the last (EOS) included; no prompt token
                hand = sum(float(logp[j - 1, seq[j]]) for j in range(len(pair["prompt"]), len(seq)))
                assert abs(float(got) - hand) < 1e-4, (family, i, side)


# ---- data: pairs, splitting, errors -----------------------------------------------------------


def test_encoding_plain_chat_and_split(setup):
    tok = Tokenizer.from_dir(setup / "tok")
    cfg = load_config(None, {"train.seq_len": 64})
    recs = [{"prompt": "the film", "chosen": " hero.", "rejected": " storm.", "_source": "x", "_line": 1},
            {"prompt": [{"role": "user", "content": "the film"}], "chosen": "hero.",
             "rejected": [{"role": "assistant", "content": "storm."}], "_source": "x", "_line": 2},
            {"instruction": "the film", "input": "", "chosen": "a", "rejected": "a", "_line": 3},
            {"chosen": "the film: hero king", "rejected": "the film: storm", "_line": 4}]  # fmt: skip
    plain, chat, split = encode_pairs(recs, tok, cfg)  # the identical pair (line 3) is dropped
    assert plain["prompt"] == tok.encode("the film", False)
    assert plain["chosen"][-1] == tok.eos_id and plain["rejected"][-1] == tok.eos_id
    assert tok.decode(plain["chosen"][:-1]) == " hero."
    assert tok.decode(chat["prompt"], False).endswith("<|im_start|>assistant\n")
    assert tok.decode(split["chosen"][:-1]) == " hero king"
    assert split_prompt("Q: a? A: yes I do", "Q: a? A: yes I don't") == ("Q: a? A: yes I", " do", " don't")  # fmt: skip
    assert split_prompt([1, 2, 3], [1, 2, 4]) == ([1, 2], [3], [4])


@pytest.mark.parametrize("line,what", [('{"prompt": "a", "chosen": "b"}', "rejected"),
                                       ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "chosen"),
                                       ('{"prompt": "a", "chosen": ["x"], "rejected": "c"}', "chosen")])  # fmt: skip
def test_malformed_pair_is_a_one_line_error(setup, capsys, line, what):
    bad = setup / "bad.jsonl"
    bad.write_text('{"prompt": "the", "chosen": " a", "rejected": " b"}\n' + line + "\n")
    args = ["align", "--model", str(setup / "base"), "--data", str(bad), "--out",
            str(setup / "bad-run"), "--max-steps", "1", "--train.device", "cpu"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2" in err and what in err and len(err.splitlines()) == 1
    with pytest.raises(DataError, match="bad.jsonl:2"):
        encode_pairs(load_records(bad), Tokenizer.from_dir(setup / "tok"), load_config())


# ---- HH-RLHF dialogues and skipped pairs ------------------------------------------------------


def _hh(*turns: str) -> str:
    """An HH-RLHF transcript from alternating human/assistant turns."""
    return "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)
    )


HH_ODD = [  # (record, why it is skipped or None)
    ({"chosen": _hh("the film?", "a hero.", "and then?", "the king ship."),
      "rejected": _hh("the film?", "a hero.", "and then?", "storm war night.")}, None),
    ({"chosen": _hh("thanks.", "You're welcome.  I'd be happy to help again."),
      "rejected": _hh("thanks.", "You're welcome.")}, None),  # rejected a strict prefix of chosen
    ({"chosen": _hh("the city?", "a river."), "rejected": _hh("the city?", "a river.")},
     "identical"),
    ({"chosen": _hh("the war?", "no.", "why?", "the storm."),
      "rejected": _hh("the war?", "yes.", "why?", "the night.")}, "prompt_mismatch"),
    ({"chosen": _hh("the love?", ""), "rejected": _hh("the love?", "a king.")}, "empty_response"),
    ({"prompt": "the", "chosen": " ", "rejected": " a"}, "empty_response"),
]  # fmt: skip


def _records(rows, source="hh.jsonl"):
    return [{**r, "_source": source, "_line": i} for i, r in enumerate(rows, 1)]


@pytest.mark.parametrize("template", [False, True])
def test_hh_dialogues_split_at_the_last_assistant_turn(setup, template):
    from tunelab.tokenizer.chat import CHATML

    tok = Tokenizer.from_dir(setup / "tok")
    tok.chat_template = CHATML if template else None
    skipped = {}
    recs = _records([r for r, _ in HH_ODD])
    multi, prefix = encode_pairs(recs, tok, load_config(None, {"train.seq_len": 256}), skipped)
    assert skipped == {"identical": ["hh.jsonl:3"], "prompt_mismatch": ["hh.jsonl:4"],
                       "empty_response": ["hh.jsonl:5", "hh.jsonl:6"]}  # fmt: skip
    text = lambda ids: tok.decode(ids, False)  # noqa: E731
    if template:  # the turns as messages: user/assistant, the last assistant turn the response
        assert text(multi["prompt"]).count("<|im_start|>user\n") == 2
        assert text(multi["prompt"]).endswith("a hero.<|im_end|>\n<|im_start|>user\nand then?"
                                              "<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
        assert text(prefix["chosen"]).startswith("You're welcome.  I'd be happy")
        assert text(prefix["rejected"]).startswith("You're welcome.<|im_end|>")
    else:  # plain text as published: the prompt ends with the last "\n\nAssistant:"
        assert text(multi["prompt"]) == _hh("the film?", "a hero.", "and then?") + "\n\nAssistant:"
        assert text(multi["chosen"][:-1]) == " the king ship."
        assert text(prefix["chosen"][:-1]) == " You're welcome.  I'd be happy to help again."
        assert text(prefix["rejected"][:-1]) == " You're welcome."
        assert prefix["rejected"][-1] == tok.eos_id


def test_transcript_messages_join_turns_of_one_role():
    from tunelab.data.dialogue import is_transcript, split_transcript, transcript_messages

    text = "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant: again\n\nHuman: ok\n\nAssistant: x"
    assert is_transcript(text) and not is_transcript("Human: hi") and not is_transcript("a")
    prompt, response = split_transcript(text)
    assert prompt.endswith("\n\nAssistant:") and response == " x"
    assert transcript_messages(prompt) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello\n\nagain"},
        {"role": "user", "content": "ok"}]  # fmt: skip


def test_unusable_pairs_are_skipped_and_counted_or_stop_a_strict_run(setup, caplog, capsys):
    rng = random.Random(1)
    rows = [r for r, _ in HH_ODD]
    for _ in range(20):
        q, a = _words(rng, 3), _words(rng, 2)
        rows.append({"chosen": _hh(q, a, "and?", GOOD), "rejected": _hh(q, a, "and?", BAD)})
    path = setup / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"data.path": str(path), "train.max_steps": 1, "data.val_fraction": 0.25}
    with caplog.at_level("WARNING", logger="tunelab"):
        summary = run_training(align_cfg(setup, setup / "hh-run", **over), task=AlignTask())
    data = json.loads((setup / "hh-run" / "summary.json").read_text())["data"]
    assert data == summary["data"]
    assert data["skipped_pairs"] == 4 and data["train_examples"] + data["val_examples"] == 22
    assert data["skipped_reasons"] == {"identical": 1, "prompt_mismatch": 1, "empty_response": 2}
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "4 of 26 pairs skipped" in lines[0]
    assert "first at hh.jsonl:3, hh.jsonl:4, hh.jsonl:5, hh.jsonl:6" in lines[0]
    args = ["align", "--model", str(setup / "base"), "--data", str(path), "--out",
            str(setup / "hh-strict"), "--max-steps", "1", "--train.device", "cpu", "--strict"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "hh.jsonl:3" in err and "same" in err and len(err.splitlines()) == 1
    cfg = load_config(None, {"align.strict": True})
    with pytest.raises(DataError, match="hh.jsonl:1: the dialogues differ"):
        encode_pairs(_records(rows[3:]), Tokenizer.from_dir(setup / "tok"), cfg)
    with pytest.raises(DataError, match="no usable preference pair left: 1 of 1 pairs skipped"):
        encode_pairs(_records(rows[2:3]), Tokenizer.from_dir(setup / "tok"), load_config())


# ---- the reference model ----------------------------------------------------------------------


def _losses(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("split") != "val"], rows


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_and_live_reference_give_the_same_losses(setup, method):
    over = {"method.name": method, "train.lr": 1e-2 if method == "lora" else 1e-3}
    if method == "lora":
        over["method.r"] = 4
    runs = {}
    for pre in (True, False):
        out = setup / f"ref-{method}-{pre}"
        task = AlignTask()
        run_training(align_cfg(setup, out, **over, **{"align.precompute_ref": pre}), task=task)
        runs[pre], rows = _losses(out)
        assert rows[0]["reward_accuracy"] == 0.5  # step 1: every pair a tie, float noise aside
        assert ("precomputed" in task.info["reference"]) == pre
        assert (out / REFERENCE_FILE).exists() == pre
    assert runs[True][0] == pytest.approx(0.6931471805599453, abs=1e-5)  # policy == reference
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert runs[True][-1] != pytest.approx(runs[True][0], abs=1e-4)  # the policy did move


def test_lora_reference_is_the_merged_sft_model_not_the_base(setup):
    import tunelab

    sft = setup / "sft"
    records = [json.loads(x) for x in (setup / "prefs.jsonl").read_text().splitlines()]
    with open(setup / "sft.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({"instruction": r["prompt"], "output": r["chosen"]}) + "\n")
    cfg = align_cfg(setup, sft, **{"task": "finetune", "data.path": str(setup / "sft.jsonl"),
                                   "method.name": "lora", "method.r": 4, "train.lr": 3e-2,
                                   "train.max_steps": 10, "train.seq_len": 256})  # fmt: skip
    run_training(cfg)  # writes sft/final: the merged SFT weights
    cfg = align_cfg(setup, setup / "after-sft", **{"model": str(sft / "final"),
                                                   "method.name": "lora", "method.r": 4})  # fmt: skip
    start = tunelab.load(sft / "final")
    task = AlignTask()
    model = task.prepare(start.model, start.tokenizer, cfg)
    apply_method(model, cfg.method)
    parts = {"train": encode_pairs(load_records(setup / "prefs.jsonl")[:8], start.tokenizer, cfg)}
    precomputed = cached_reference(model, parts, cfg, 0, setup / "ref.safetensors")["train"]
    reference, how = live_reference(model)
    assert "LoRA disabled" in how
    with torch.no_grad():  # training moves the adapter; the reference must not move with it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = collate_pairs(parts["train"], 0)
    sft_model = tunelab.load(sft / "final").model.eval()
    base_model = tunelab.load(setup / "base").model.eval()
    with torch.no_grad():
        live = torch.stack(reference(batch))
        expected = torch.stack(pair_logps(sft_model, batch))
        base = torch.stack(pair_logps(base_model, batch))
        policy = torch.stack(pair_logps(model.eval(), batch))
    assert torch.allclose(live, expected, atol=1e-4)
    assert torch.allclose(torch.stack(precomputed), expected, atol=1e-4)
    assert (base - expected).abs().max() > 0.1  # the SFT run really changed the model
    assert (policy - expected).abs().max() > 0.1


def test_a_frozen_adapter_is_never_disabled_for_the_reference():
    from tunelab.adapt.lora import apply_lora
    from tunelab.train.reference import only_lora_trains

    model = build_model(preset("llama-tiny", vocab_size=50, n_layer=1, d_model=32, d_ff=64))
    apply_lora(model, r=2)
    assert only_lora_trains(model)
    model.transformer.layers[0].attn.q_proj.lora_A.weight.requires_grad_(
        False
    )  # e.g. a loaded SFT adapter
    assert not only_lora_trains(model)
    assert live_reference(model)[1].startswith("frozen copy")


def test_reference_cache_is_reused_and_keyed(setup, monkeypatch):
    import tunelab.train.reference as reference

    cfg = align_cfg(setup, setup / "unused")
    lm_model = build_model(preset("llama-tiny", vocab_size=300, n_layer=1, d_model=32, d_ff=64))
    parts = {"train": encode_pairs(load_records(setup / "prefs.jsonl")[:4],
                                   Tokenizer.from_dir(setup / "tok"), cfg)}  # fmt: skip
    path = setup / "cache-test.safetensors"
    first = cached_reference(lm_model, parts, cfg, 0, path)
    monkeypatch.setattr(reference, "compute_reference", lambda *a: pytest.fail("recomputed"))
    again = cached_reference(lm_model, parts, cfg, 0, path)
    assert torch.equal(first["train"][0], again["train"][0])
    cfg.align.beta = 0.5  # not part of the key: the loss changes, the reference does not
    cached_reference(lm_model, parts, cfg, 0, path)
    cfg.train.seed = 1  # a different start model: recomputed
    with pytest.raises(pytest.fail.Exception):
        cached_reference(lm_model, parts, cfg, 0, path)


# ---- end to end -------------------------------------------------------------------------------


def test_agreement_rises_on_a_learnable_preference(setup):
    out = setup / "learn"
    cfg = align_cfg(setup, out, **{"train.max_steps": 30, "train.lr": 3e-3, "train.eval_every": 10,
                                   "align.beta": 0.5})  # fmt: skip
    summary = run_training(cfg, task=AlignTask())
    acc, margin = summary["preference_accuracy"], summary["reward_margin"]
    assert acc["before"] == 0.5 and margin["before"] == 0.0  # policy == reference: all ties
    assert acc["after"] >= 0.9 and margin["after"] > 0.5
    losses, rows = _losses(out)
    assert losses[-1] < 0.5 * losses[0]
    train = rows[-2] if rows[-1].get("split") == "val" else rows[-1]
    val = [r for r in rows if r.get("split") == "val"]
    assert len(val) == 3
    for key in ("reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected",
                "logp_chosen", "logp_rejected"):  # fmt: skip
        assert key in train and f"val_{key}" in val[-1]
    assert val[-1]["val_reward_accuracy"] == pytest.approx(acc["after"])
    assert summary["align"]["loss"] == "dpo" and summary["data"]["kind"] == "preference"


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_cli_align_on_a_tiny_model_dir(setup, capsys, loss):
    out = setup / f"cli-{loss}"
    args = ["align", "--model", str(setup / "base"), "--data", str(setup / "prefs.jsonl"),
            "--method", "lora", "--method.r", "4", "--loss", loss, "--beta", "0.1",
            "--label-smoothing", "0", "--precompute-ref", "--max-steps", "2", "--seq-len", "64",
            "--out", str(out), "--train.device", "cpu", "--json"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["align"]["loss"] == loss
    assert set(summary["preference_accuracy"]) == {"before", "after"}
    assert set(summary["reward_margin"]) == {"before", "after"}
    assert (out / REFERENCE_FILE).exists() and (out / "adapter" / "adapter_config.json").exists()
    assert main(["align", "--resume", str(out), "--json"]) == 0  # finished: returns the summary


@pytest.mark.parametrize("recipe", ["dpo.yaml", "dpo-hh.yaml"])
def test_recipe_is_a_valid_align_config(recipe):
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / recipe)
    assert cfg.task == "align" and cfg.align.loss in ("dpo", "ipo", "hinge")


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data/preferences")
def test_shared_preference_files_encode(setup):
    from tunelab.tokenizer.chat import CHATML

    tok = Tokenizer.from_dir(setup / "tok")
    cfg = load_config(None, {"train.seq_len": 4096})
    rasbt = load_records(SHARED / "instruction-data-with-preference.json")
    assert len(encode_pairs(rasbt, tok, cfg)) == len(rasbt) - 6  # 6 have chosen == rejected
    hh = load_records(SHARED / "hh_rlhf_harmless_test_part_a.jsonl")
    for template in (None, CHATML):  # plain text as published; messages through a template
        tok.chat_template, skipped = template, {}
        pairs = encode_pairs(hh, tok, cfg, skipped)
        # PROVENANCE_hh_rlhf.md: 4 rows end on an empty Assistant turn, 4 differ earlier on
        assert {k: len(v) for k, v in skipped.items()} == {"empty_response": 4,
                                                           "prompt_mismatch": 4}  # fmt: skip
        assert len(pairs) == len(hh) - 8 == 1804
        tail = "<|im_start|>assistant\n" if template else "\n\nAssistant:"
        assert all(tok.decode(p["prompt"], False).endswith(tail) for p in pairs)
