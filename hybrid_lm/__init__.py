"""hybrid_lm: Jamba-style hybrid attention / Mamba / mixture-of-experts language models for transformers.

Importing the package registers `model_type = "hybrid_lm"` with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .configuration_hybrid_lm import HybridLMConfig
from .modeling_hybrid_lm import (
    HybridLMForCausalLM,
    HybridLMForSequenceClassification,
    HybridLMModel,
    HybridLMPreTrainedModel,
)
from .tokenization_hybrid_lm import HybridLMTokenizer, train_tokenizer

__version__ = "0.1.0"

AutoConfig.register(HybridLMConfig.model_type, HybridLMConfig, exist_ok=True)
AutoModel.register(HybridLMConfig, HybridLMModel, exist_ok=True)
AutoModelForCausalLM.register(HybridLMConfig, HybridLMForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(HybridLMConfig, HybridLMForSequenceClassification, exist_ok=True)
AutoTokenizer.register(HybridLMConfig, tokenizer_class=HybridLMTokenizer, exist_ok=True)

# save_pretrained writes `auto_map` and copies the model files, so trust_remote_code=True loads a
# checkpoint on a machine without this package.
HybridLMConfig.register_for_auto_class()
HybridLMModel.register_for_auto_class("AutoModel")
HybridLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
HybridLMForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
HybridLMTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = [
    "HybridLMConfig",
    "HybridLMForCausalLM",
    "HybridLMForSequenceClassification",
    "HybridLMModel",
    "HybridLMPreTrainedModel",
    "HybridLMTokenizer",
    "train_tokenizer",
]
