"""Sequence classifiers against transformers' *ForSequenceClassification on tiny random models."""

import pytest
import torch

from tunelab.model.checkpoint import export_hf, load_model_dir
from tunelab.model.heads import SequenceClassifier

transformers = pytest.importorskip("transformers")

VOCAB, PAD = 96, 0
LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def _configs():
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=PAD,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    return {
        "gpt2": (
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_embd=64,
                n_layer=2,
                n_head=4,
                n_positions=128,
                pad_token_id=PAD,
                id2label=LABELS,
            ),
            transformers.GPT2ForSequenceClassification,
        ),
        "llama": (
            transformers.LlamaConfig(**common, num_key_value_heads=2),
            transformers.LlamaForSequenceClassification,
        ),
        "bert": (
            transformers.BertConfig(**common, type_vocab_size=2),
            transformers.BertForSequenceClassification,
        ),
    }


def _random_hf(name, tmp_path):
    cfg, cls = _configs()[name]
    torch.manual_seed(7)
    model = cls(cfg).eval()
    with torch.no_grad():  # randomise norms and biases too, so a mis-mapped one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / name)
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.save(str(tmp_path / name / "tokenizer.json"))
    return model, tmp_path / name


def _inputs():
    ids = torch.randint(1, VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding, as HF decoders expect: the pad id marks the end
    mask[2, -6:] = 0
    ids[mask == 0] = PAD
    return ids, mask


@pytest.mark.parametrize("name", list(_configs()))
def test_classifier_logits_match_transformers(name, tmp_path):
    hf, path = _random_hf(name, tmp_path)
    ours, _ = load_model_dir(path)
    assert isinstance(ours, SequenceClassifier)
    assert ours.cfg.labels == ["neg", "neutral", "pos"]
    ids, mask = _inputs()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(input_ids=ids, attention_mask=mask).logits
    assert a.shape == (3, 3)
    assert (a - b).abs().max() < 1e-4
    assert a.abs().max() > 1e-2


@pytest.mark.parametrize("name", list(_configs()))
def test_classifier_exports_back(name, tmp_path):
    hf, path = _random_hf(name, tmp_path)
    ours, _ = load_model_dir(path)
    export_hf(ours, None, tmp_path / "export")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "export")
    assert type(back) is type(hf)
    assert back.config.id2label == LABELS
    ids, mask = _inputs()
    with torch.no_grad():
        a = back.eval()(input_ids=ids, attention_mask=mask).logits
        diff = a - hf(input_ids=ids, attention_mask=mask).logits
    assert diff.abs().max() < 1e-5


def test_left_and_right_padding_agree(tmp_path):
    _, path = _random_hf("llama", tmp_path)
    ours, _ = load_model_dir(path)
    ids = torch.randint(1, VOCAB, (1, 7))
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mr = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
    ml = mr.flip(1)
    with torch.no_grad():
        alone = ours(ids)
        assert (ours(right, attention_mask=mr) - alone).abs().max() < 1e-5
        assert (ours(left, attention_mask=ml) - alone).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("window", [None, 3])
def test_last_block_at_the_pooled_position_alone_equals_the_whole_block(family, window):
    """keep= computes the last block for one position per row; it must equal the full pass."""
    from tunelab.model.config import ModelConfig
    from tunelab.model.transformer import Transformer

    if family == "bert" and window:
        pytest.skip("encoders have no sliding window")
    torch.manual_seed(0)
    cfg = ModelConfig(
        family=family,
        vocab_size=40,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if family == "llama" else 4,
        d_model=16,
        d_ff=32,
        sliding_window=window,
        **(
            {}
            if family == "llama"
            else dict(
                causal=False,
                post_norm=True,
                norm="layernorm",
                pos="learned",
                mlp="gelu",
                act="gelu",
                type_vocab_size=2,
            )
        ),
    )
    model = Transformer(cfg).eval()
    ids = torch.randint(1, 40, (3, 7))
    for mask in (None, torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])):
        keep = torch.tensor([6, 3, 6] if family == "llama" else [0, 0, 2])  # real positions
        full = model(ids, mask)
        part = model(ids, mask, keep=keep)
        assert part.shape == (3, 1, 16)
        assert torch.allclose(part[:, 0], full[torch.arange(3), keep], atol=1e-6)
