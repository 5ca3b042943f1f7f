"""Logits of every family against transformers models built from tiny random configs."""

import pytest
import torch

from tunelab.model.checkpoint import export_hf, load_model_dir

transformers = pytest.importorskip("transformers")

VOCAB = 96


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
        "gpt2": (
            transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128
            ),
            transformers.GPT2LMHeadModel,
        ),
        "llama": (
            transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False),
            transformers.LlamaForCausalLM,
        ),
        "llama-tied": (
            transformers.LlamaConfig(
                **common, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=100000.0
            ),
            transformers.LlamaForCausalLM,
        ),
        "mistral": (
            transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
            transformers.MistralForCausalLM,
        ),
        "qwen2": (
            transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
            transformers.Qwen2ForCausalLM,
        ),
        "gemma": (
            transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=32),
            transformers.GemmaForCausalLM,
        ),
        "bert": (transformers.BertConfig(**common, type_vocab_size=2), transformers.BertModel),
    }


FAMILIES = list(_configs())


def _random_hf(name, tmp_path):
    cfg, cls = _configs()[name]
    torch.manual_seed(hash(name) % 1000)
    model = cls(cfg).eval()
    with torch.no_grad():  # randomise norms and biases too, so a mis-mapped one shows
        for _n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def _inputs(seq=13, batch=3):
    ids = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -4:] = 0  # a right-padded row
    mask[2, -7:] = 0
    return ids, mask


def _ours(model, ids, mask):
    if model.cfg.causal:
        return model(ids, attention_mask=mask)
    return model(ids, attention_mask=mask)


def _theirs(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, tmp_path):
    hf, path = _random_hf(name, tmp_path)
    ours, _ = load_model_dir_no_tok(path)
    ids, mask = _inputs()
    with torch.no_grad():
        a, b = _ours(ours, ids, mask), _theirs(hf, ids, mask)
    valid = mask.bool()  # padded positions are undefined in both
    assert (a[valid] - b[valid]).abs().max() < 1e-4
    assert a.abs().max() > 1e-2  # not a trivially-zero output


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_in_transformers(name, tmp_path):
    hf, path = _random_hf(name, tmp_path)
    ours, _ = load_model_dir_no_tok(path)
    export_hf(ours, None, tmp_path / "export")
    _, cls = _configs()[name]
    back = cls.from_pretrained(tmp_path / "export").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        assert (_theirs(back, ids, mask) - _theirs(hf, ids, mask))[mask.bool()].abs().max() < 1e-5


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_export_in_shards_reloads_in_transformers(name, tmp_path, monkeypatch):
    from tunelab.model import weights

    monkeypatch.setattr(weights, "SHARD_BYTES", 40_000)  # the tiny model in several shards
    hf, path = _random_hf(name, tmp_path)
    ours, _ = load_model_dir_no_tok(path)
    export_hf(ours, None, tmp_path / "export")
    assert len(list((tmp_path / "export").glob("model-*.safetensors"))) > 2
    assert (tmp_path / "export" / "model.safetensors.index.json").exists()
    _, cls = _configs()[name]
    back = cls.from_pretrained(tmp_path / "export").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        assert (_theirs(back, ids, mask) - _theirs(hf, ids, mask))[mask.bool()].abs().max() < 1e-5


def test_bert_pooler_matches(tmp_path):
    hf, path = _random_hf("bert", tmp_path)
    ours, _ = load_model_dir_no_tok(path)
    ids, mask = _inputs()
    with torch.no_grad():
        pooled = ours.pooler(ours(ids, attention_mask=mask))
        assert (pooled - hf(input_ids=ids, attention_mask=mask).pooler_output).abs().max() < 1e-5


def load_model_dir_no_tok(path):
    """Tiny random models have no tokenizer; give them a trivial one so loading is exercised."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    return load_model_dir(path)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_padded_batch_equals_each_sequence_alone(family):
    """The transformer packs the real tokens of a padded batch (Packed): every real position
    must come out as it does for that sequence run alone, and so must the gradients."""
    from tunelab.model.config import ModelConfig
    from tunelab.model.transformer import Transformer

    extra = {
        "llama": dict(n_kv_head=2),
        "gpt2": dict(
            family="gpt2",
            pos="learned",
            norm="layernorm",
            mlp="gelu",
            act="gelu",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
        ),
        "bert": dict(
            family="bert",
            causal=False,
            post_norm=True,
            norm="layernorm",
            pos="learned",
            mlp="gelu",
            act="gelu",
            type_vocab_size=2,
        ),
    }[family]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=4, d_model=16, d_ff=32, **extra)
    model = Transformer(cfg)
    lengths, t = [7, 4, 5], 7
    ids = torch.randint(1, 40, (3, t))
    for left in (False, True) if cfg.causal else (False,):
        mask = torch.zeros(3, t, dtype=torch.long)
        for i, n in enumerate(lengths):
            if left:
                mask[i, t - n :] = 1
            else:
                mask[i, :n] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0) if left else None
        model.zero_grad()
        out = model(ids, mask, pos)
        real = mask.bool()
        out[real].square().sum().backward()
        batched = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        total = 0
        for i, n in enumerate(lengths):
            row = ids[i : i + 1, t - n :] if left else ids[i : i + 1, :n]
            alone = model(row)
            torch.testing.assert_close(out[i][real[i]], alone[0], atol=1e-5, rtol=1e-5)
            total = total + alone.square().sum()
        total.backward()
        for g, p in zip(batched, model.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-4, rtol=1e-4)
