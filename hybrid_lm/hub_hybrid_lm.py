"""Hub publishing: the generated model card and the upload of a saved HybridLM folder."""

import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

CARD_TAGS = ["hybrid_lm", "jamba", "mamba", "text-generation"]


def parameter_counts(model) -> tuple[int, int]:
    """(total, active per token): the experts a token is not routed to do not count as active."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.base_model.layers:
        if getattr(layer, "is_moe", False):
            per_expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
            inactive += (config.num_experts - config.num_experts_per_tok) * per_expert
    return total, total - inactive


def model_card(model, repo_id: str, tags: list[str] | None = None) -> ModelCard:
    """A card with library_name, tags, the layer plan and parameter counts, plus loading instructions."""
    config = model.config
    total, active = parameter_counts(model)
    card_tags = list(dict.fromkeys(CARD_TAGS + (["mixture-of-experts"] if total != active else []) + (tags or [])))
    data = ModelCardData(library_name="transformers", tags=card_tags, pipeline_tag="text-generation")
    body = f"""
# {repo_id.split("/")[-1]}

A hybrid language model made with hybrid_lm (not on PyPI; see "Use" below): attention and Mamba
(selective state space) layers with dense or mixture-of-experts feed-forward layers, Jamba-style.

## Layer plan

```
{config.layer_plan()}
```

## Parameters

| | count |
| --- | --- |
| total | {total:,} ({total / 1e6:.1f}M) |
| active per token | {active:,} ({active / 1e6:.1f}M) |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
```

With the hybrid_lm package installed from its source (`pip install -e .` in a checkout; it is not on PyPI) and
`import hybrid_lm`, the Auto classes load it without `trust_remote_code`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def push_folder_to_hub(model, repo_id: str, *, commit_message=None, commit_description=None, private=None,
                       token=None, revision=None, create_pr=False, max_shard_size="50GB", tags=None):
    """save_pretrained (weights, config, model code) + README.md model card, uploaded as one commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        model_card(model, repo_id, tags).save(f"{folder}/README.md")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(folder).rglob("*")) if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id, operations=operations, commit_message=commit_message or "Upload HybridLM model",
            commit_description=commit_description, revision=revision, create_pr=create_pr,
        )
