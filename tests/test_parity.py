"""Logits of every family against transformers models built from tiny random configs."""

import pytest
import torch

from tunelab.model.checkpoint import export_hf, load_model_dir

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _configs():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    return {
        "gpt2": (transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
                 transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False),
                  transformers.LlamaForCausalLM),
        "llama-tied": (transformers.LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True,
                                                rope_theta=100000.0), transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=8),
                    transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
                  transformers.Qwen2ForCausalLM),
        "gemma": (transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=32),
                  transformers.GemmaForCausalLM),
        "bert": (transformers.BertConfig(**common, type_vocab_size=2), transformers.BertModel),
    }  # fmt: skip


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
