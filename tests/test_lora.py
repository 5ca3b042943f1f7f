"""LoRA against peft on tiny random models of every family: save, load, merge, rsLoRA, training."""

import json
import os

import pytest
import torch
from batches import ListBatches  # noqa: I001 - tests/ is on sys.path
from torch import nn

from tunelab.adapt import apply_method
from tunelab.adapt.lora import LoRALinear, apply_lora, lora_modules, merge_lora
from tunelab.adapt.peft_format import load_adapter, save_adapter
from tunelab.errors import ConfigError
from tunelab.model.checkpoint import load_model_dir
from tunelab.model.config import ModelConfig
from tunelab.model.heads import CausalLM
from tunelab.train.config import TrainConfig
from tunelab.train.loop import Trainer
from tunelab.train.objectives import causal_lm

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# HF target names for peft's own adapters, per family
HF_TARGETS = {
    "llama": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "gemma": LLAMA_LIKE, "mistral": LLAMA_LIKE,
    "gpt2": ["c_attn", "c_proj", "c_fc"], "bert": ["query", "value", "attention.output.dense"],
}  # fmt: skip


def _configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return {
        "llama": (
            transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False),
            transformers.LlamaForCausalLM,
        ),
        "qwen2": (
            transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
            transformers.Qwen2ForCausalLM,
        ),
        "gemma": (
            transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=32),
            transformers.GemmaForCausalLM,
        ),
        "mistral": (
            transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
            transformers.MistralForCausalLM,
        ),
        "gpt2": (
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128
            ),
            transformers.GPT2LMHeadModel,
        ),
        "bert": (transformers.BertConfig(**common, type_vocab_size=2), transformers.BertModel),
    }


FAMILIES = list(_configs())


def _random_hf(name, tmp_path, seed=0):
    """A tiny random transformers model saved to disk, and ours loaded from it."""
    from tokenizers import Tokenizer, models

    cfg, cls = _configs()[name]
    torch.manual_seed(seed)
    hf = cls(cfg).eval()
    path = tmp_path / name
    hf.save_pretrained(path)
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    ours, _ = load_model_dir(path)
    return hf, ours


def _inputs(seq=11, batch=3):
    torch.manual_seed(123)
    ids = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -4:] = 0
    return ids, mask


def _ours(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def _theirs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


def _randomise(model, scale=0.2):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, scale)


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_adapter_matches_peft(name, tmp_path):
    hf, ours = _random_hf(name, tmp_path)
    ids, mask = _inputs()
    before = _ours(ours, ids, mask)
    apply_lora(ours, r=4, alpha=8, targets="all-linear")
    _randomise(ours)
    after = _ours(ours, ids, mask)
    assert _diff(after, before, mask) > 1e-2  # the adapter changes the output
    old = os.umask(0o022)
    try:
        save_adapter(ours, tmp_path / "adapter")
    finally:
        os.umask(old)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o644  # the user's umask (safetensors wrote 0600)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert _diff(_theirs(peft_model, ids, mask), after, mask) < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_trained_adapter_loads(name, tmp_path):
    hf, ours = _random_hf(name, tmp_path)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=HF_TARGETS[name], init_lora_weights=False
    )
    ids, mask = _inputs()
    base = _theirs(hf, ids, mask)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf, config).eval()  # random A and B
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    expected = _theirs(peft_model, ids, mask)
    assert _diff(_ours(ours, ids, mask), expected, mask) < 1e-4
    assert _diff(base, expected, mask) > 1e-3


def test_gpt2_partial_qkv_and_patterns(tmp_path):
    """q and v of the fused c_attn only, with rsLoRA: the block LoRA keeps k untouched."""
    hf, ours = _random_hf("gpt2", tmp_path)
    apply_lora(ours, r=2, alpha=4, targets=("q_proj", "v_proj", "mlp.down_proj"), rslora=True)
    _randomise(ours)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_attn", "mlp.c_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ids, mask = _inputs()
    assert _diff(_theirs(peft_model, ids, mask), _ours(ours, ids, mask), mask) < 1e-4


def test_rslora_matches_peft(tmp_path):
    hf, ours = _random_hf("llama", tmp_path)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=4,
        target_modules=["q_proj", "down_proj"],
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = peft.get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    m = ours.transformer.layers[0].attn.q_proj
    assert m.rslora and m.scaling == pytest.approx(4 / 8**0.5)
    ids, mask = _inputs()
    assert _diff(_ours(ours, ids, mask), _theirs(peft_model, ids, mask), mask) < 1e-4


def test_subset_of_layers_saved_as_exact_regex(tmp_path):
    hf, ours = _random_hf("qwen2", tmp_path)
    apply_lora(ours, r=4, alpha=8, targets="layers.1.attn.q_proj")
    _randomise(ours)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # "q_proj" would over-reach to layer 0
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ids, mask = _inputs()
    assert _diff(_theirs(peft_model, ids, mask), _ours(ours, ids, mask), mask) < 1e-4


def test_trained_head_saved_as_modules_to_save(tmp_path):
    hf, ours = _random_hf("llama", tmp_path)
    apply_lora(ours, r=4, alpha=8, train_head=True)
    _randomise(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(0.5)
    save_adapter(ours, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    ids, mask = _inputs()
    assert _diff(_theirs(peft_model, ids, mask), _ours(ours, ids, mask), mask) < 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_lora(name, tmp_path):
    _, ours = _random_hf(name, tmp_path)
    apply_lora(ours, r=4, alpha=8, targets="all-linear", dropout=0.1)
    _randomise(ours)
    ours.eval()
    ids, mask = _inputs()
    expected = _ours(ours, ids, mask)
    w0 = ours.transformer.layers[0].attn.v_proj.base.weight.clone()
    for m in lora_modules(ours).values():
        m.merge()
    assert _diff(_ours(ours, ids, mask), expected, mask) < 1e-5
    for m in lora_modules(ours).values():
        m.unmerge()
    assert (ours.transformer.layers[0].attn.v_proj.base.weight - w0).abs().max() < 1e-6
    assert _diff(_ours(ours, ids, mask), expected, mask) < 1e-5
    merge_lora(ours)
    assert not lora_modules(ours)
    assert type(ours.transformer.layers[0].attn.v_proj) is nn.Linear
    assert _diff(_ours(ours, ids, mask), expected, mask) < 1e-5


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64
    )
    return CausalLM(cfg)


def test_only_lora_trainable_and_flags():
    model = apply_lora(tiny_model(), r=2, targets=("q_proj", "v_proj"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    model = apply_lora(tiny_model(), r=2, train_head=True, train_embeddings=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lm_head.weight", "transformer.tok_embed.weight"} <= trainable
    a = model.transformer.layers[0].attn.q_proj
    assert isinstance(a, LoRALinear) and a.scaling == 16 / 2 and a.lora_B.weight.abs().max() == 0


def test_unknown_target_lists_modules():
    with pytest.raises(ConfigError, match=r"'qkv'.*q_proj.*up_proj"):
        apply_lora(tiny_model(), targets=("q_proj", "qkv"))


def test_all_linear_excludes_head():
    model = apply_lora(tiny_model(), targets="all-linear")
    assert len(lora_modules(model)) == 2 * 7 and isinstance(model.lm_head, nn.Linear)


def test_dispatcher_coerces_cli_strings():
    model = tiny_model()
    opts = {"name": "lora", "r": "4", "alpha": "8", "targets": "q_proj, o_proj", "rslora": "true"}
    assert apply_method(model, opts) == []
    m = model.transformer.layers[1].attn.o_proj
    assert isinstance(m, LoRALinear) and m.r == 4 and m.scaling == pytest.approx(8 / 2)
    assert not isinstance(model.transformer.layers[1].attn.v_proj, LoRALinear)
    with pytest.raises(ConfigError, match=r"'rank'.*did you mean 'r'"):
        apply_method(tiny_model(), {"name": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="bits"):
        apply_method(tiny_model(), {"name": "lora", "bits": "nf4"})


def train(tmp_path, model, steps=40):
    """Train on four memorisable sequences; returns (first loss, last loss, summary)."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(1, 50, (10,), generator=g).tolist() for _ in range(4)]
    cfg = TrainConfig(
        lr=3e-2, weight_decay=0.0, warmup_steps=0, schedule="constant", batch_size=4, log_every=1
    )
    summary = Trainer(model, causal_lm, ListBatches(data, 4), cfg, tmp_path, steps).fit()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return losses[0], losses[-1], summary


def test_training_reduces_loss_and_keeps_base(tmp_path):
    model = apply_lora(tiny_model(), r=4, alpha=8, targets="all-linear")
    base = model.transformer.layers[0].mlp.up_proj.base.weight.clone()
    first, last, summary = train(tmp_path, model)
    assert last < 0.7 * first
    assert torch.equal(model.transformer.layers[0].mlp.up_proj.base.weight, base)
    assert summary["trainable_params"] < summary["total_params"] / 3
