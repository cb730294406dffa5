"""A tiny byte-level BPE tokenizer with a ChatML template and a tiny Llama on it, built locally (no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["user assistant system", "What is 12 + 30? 42", "hello there, how are you?", "the cat sat on the mat",
          "Reverse the order of these words: apple river stone", "one two three four five six seven"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes, decodes back exactly), about 300 tokens, ChatML template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = TEMPLATE
    return tok


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                         tie_word_embeddings=False)
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
    """A PEFT LoRA of `base` (a model directory or a model) with random non-zero A and B, saved to out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = base if isinstance(base, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False} | lora
    get_peft_model(model, LoraConfig(**lora)).save_pretrained(out)
    return out
