"""push_to_hub, captured: the commit huggingface_hub would send is written to a folder and loaded from there."""

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybrid_lm
from builders import assert_same_weights, run_without_package, tiny_model


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Replaces the network side of huggingface_hub; returns the folder holding what was committed."""
    remote = tmp_path / "remote"
    remote.mkdir()
    commits = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        return Repo(repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        commits.append([op.path_in_repo for op in operations])
        for op in operations:
            assert isinstance(op, CommitOperationAdd), op
            target = remote / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            target.write_bytes(source if isinstance(source, bytes) else open(source, "rb").read())
        return f"commit {len(commits)}"

    def validate_yaml(self, content, **kwargs):  # the Hub validates the card's metadata; check it parses
        yaml.safe_load(content.split("---")[1])

    def load_card(repo_id, **kwargs):
        if not (remote / "README.md").exists():
            raise huggingface_hub.errors.EntryNotFoundError("no card yet")
        return huggingface_hub.ModelCard((remote / "README.md").read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.HfApi, "_validate_yaml", validate_yaml)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", staticmethod(load_card))
    return remote, commits


def test_push_to_hub_uploads_a_loadable_folder_with_a_model_card(hub, tmp_path):
    hub, commits = hub
    tokenizer = hybrid_lm.train_tokenizer(iter(["x = 12 + 30\n"] * 20), vocab_size=280, show_progress=False)
    model = tiny_model(vocab_size=len(tokenizer))
    model.push_to_hub("someone/tiny-hybrid", tags=["demo"])
    tokenizer.push_to_hub("someone/tiny-hybrid")

    assert len(commits) == 2
    assert {"tokenizer.json", "tokenizer_config.json", "tokenization_hybrid_lm.py"} <= set(commits[1])
    files = set(commits[0])
    assert {"config.json", "model.safetensors", "README.md", "modeling_hybrid_lm.py",
            "configuration_hybrid_lm.py"} <= files
    card = (hub / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert {"hybrid_lm", "demo", "mixture-of-experts"} <= set(metadata["tags"])
    assert model.config.layer_plan() in card
    total, active = hybrid_lm.hub_hybrid_lm.parameter_counts(model)
    per_expert = sum(p.numel() for p in model.model.layers[1].feed_forward.experts[0].parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert total - active == 2 * (4 - 2) * per_expert  # two MoE layers, 2 of 4 experts idle per token
    assert f"{total:,}" in card and f"{active:,}" in card

    assert model.config.layer_plan() in (hub / "README.md").read_text()  # the tokenizer push kept the card

    input_ids = tokenizer(["x = 1", "y = 12 + 3"], return_tensors="pt", padding=True)
    expected = model(**input_ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(hub)
    assert_same_weights(loaded.state_dict(), model.state_dict())
    torch.testing.assert_close(loaded(**input_ids).logits, expected)
    assert AutoTokenizer.from_pretrained(hub)("y = 12 + 3")["input_ids"] == tokenizer("y = 12 + 3")["input_ids"]
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(hub)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(hub)!r}, trust_remote_code=True)
        inputs = tokenizer(["x = 1", "y = 12 + 3"], return_tensors="pt", padding=True)
        torch.save({{"weights": model.state_dict(), "logits": model(**inputs).logits.detach()}},
                   {str(tmp_path / "remote.pt")!r})
        print(type(tokenizer).__name__)
        """,
        tmp_path,
    )
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    assert_same_weights(remote["weights"], model.state_dict())
    assert (remote["logits"] - expected).abs().max().item() <= 1e-5  # float32 rounding (see assert_same_weights)
    assert "HybridLMTokenizer" in out


def test_model_card_does_not_point_at_a_package_pypi_lacks():
    card = str(hybrid_lm.hub_hybrid_lm.model_card(tiny_model(), "user/tiny", None))
    assert "pip install hybrid-lm" not in card and "pypi.org/project/hybrid-lm" not in card
    assert "installed from its source (`pip install -e .` in a checkout; it is not on PyPI)" in card
