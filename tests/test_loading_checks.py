"""loading_checks: a bad path or a damaged weight file is named, with the fix, before transformers reads it."""

import json

import pytest

import hybrid_lm
from builders import tiny_model
from hybrid_lm.loading_checks import check_weight_files, local_folder


def test_hub_ids_pass_and_local_paths_are_checked(tmp_path):
    assert local_folder("org/model") is None and local_folder("gpt2") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_folder(tmp_path / "org" / "model")  # a Path is always local
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_folder("out/quickstart/model/x")


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", r"model\.safetensors is empty; save the model again or re-download the file"),
    (lambda data: data[:-100], r"model\.safetensors is truncated or damaged \(.*not fully covered\)"),
    (lambda data: data[:1000], r"model\.safetensors is truncated or damaged \(.*invalid header length\)"),
])
def test_a_damaged_weight_file_is_named(tmp_path, damage, message):
    tiny_model().save_pretrained(tmp_path)
    check_weight_files(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=message):
        check_weight_files(tmp_path)
    with pytest.raises(ValueError, match=message):  # and where users meet it
        hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path)


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(NotADirectoryError, match=r"config\.json is a file; pass the folder that holds the checkpoint"):
        check_weight_files(tmp_path / "config.json")


def test_the_model_names_a_missing_folder_an_empty_one_and_a_config_without_model_type(tmp_path):
    """HybridLMForCausalLM.from_pretrained; the Auto classes go by transformers' own reader and messages."""
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist \(and is not a Hub repo id\); pass a folder "
                                                r"written by save_pretrained, or a Hub repo id such as 'org/model'"):
        hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is an empty folder: nothing to load; point at the folder"):
        hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path / "empty")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json of .*ckpt has no model_type; a hybrid_lm config says"):
        hybrid_lm.HybridLMForCausalLM.from_pretrained(tmp_path / "ckpt")
