"""Shared test fixtures: tiny randomly initialised transformers models (no downloads)."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer causal LM of the given family, deterministic for a seed, in eval mode."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        )
    else:
        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }[kind]
        model = model_cls(config_cls(**{**TINY, **overrides}))
    return model.eval()


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def input_ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state that a Trainer left (TRL's SFTConfig turns on bf16 on
    a CPU): a later Accelerator() in the same process would inherit it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
