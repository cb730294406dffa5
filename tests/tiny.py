"""A tiny byte-level BPE tokenizer with a ChatML template and a tiny Llama on it, built
locally (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmoe import lmoe_layers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "user assistant system",
    "What is 12 + 30? 42",
    "hello there, how are you?",
    "the cat sat on the mat",
    "Reverse the order of these words: apple river stone",
    "one two three four five six seven",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes, decodes back exactly), about 300
    tokens, ChatML template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_model_dir(path: Path) -> Path:
    """A local HF model directory (tiny Llama + tokenizer), what `--model DIR` loads."""
    tok = tiny_tokenizer()
    tiny_llama(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def peft_lora_dir(base, out: Path, seed: int, **lora) -> Path:
    """A PEFT LoRA of `base` (a model directory or a model) with random non-zero A
    and B, saved to out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = (
        base if isinstance(base, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(base)
    )
    torch.manual_seed(seed)
    lora = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "init_lora_weights": False,
    } | lora
    get_peft_model(model, LoraConfig(**lora)).save_pretrained(out)
    return out


def fix_routing(model, g):
    """Make every router return g (E,) for every token: zero gate, bias log g
    (exp(-inf) = 0 exactly)."""
    with torch.no_grad():
        for name, layer in lmoe_layers(model):
            weights = g[name] if isinstance(g, dict) else g
            layer.router.weight.zero_()
            bias = weights.float().log() / layer.router.scale  # stored divided by its scale
            layer.router.bias = nn.Parameter(bias)


def train_config(setup, out, **kw):
    """A short run of the tiny model on setup = (model dir, data file),
    checkpoints every 3 steps."""
    from lmoe.training.config import TrainConfig

    model, data = setup
    fields = dict(
        model=str(model),
        data=[str(data)],
        output_dir=str(out),
        steps=6,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        save_every=3,
        compare_base=False,
        lmoe={
            "num_experts": 3,
            "rank": 2,
            "target_modules": "all-linear",
            "dropout": 0.1,
            "load_balance_coef": 0.01,
            "z_loss_coef": 0.001,
        },
    )
    fields.update(kw)
    return TrainConfig.from_dict(fields)


def worker_pythonpath(test_file: str) -> str:
    """PYTHONPATH for a test file run as a torchrun worker: the repository, tests/ (conftest,
    tiny), its own folder."""
    here = Path(test_file).resolve().parent
    tests = next(p for p in (here, *here.parents) if p.name == "tests")
    return os.pathsep.join([str(tests.parent), str(tests), str(here)])
