"""lmoe.models: a GGUF file written here (no download) loads with the original
logits and is cached."""

import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from tiny import tiny_llama, tiny_model_dir, tiny_tokenizer

from lmoe import models


def permute(w: torch.Tensor, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k row order (rotary halves interleaved per head)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
        .numpy()
    )


def write_gguf(path, model, tok) -> None:
    """What convert_hf_to_gguf.py writes for a Llama, at float32, with the tokenizer
    and chat template."""
    c = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(
        c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
    )
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_token_list(tokens)
    w.add_token_types(
        [TokenType.CONTROL if t.startswith("<|") else TokenType.NORMAL for t in tokens]
    )
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(
            f"blk.{i}.attn_q.weight",
            permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
        )
        w.add_tensor(
            f"blk.{i}.attn_k.weight",
            permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
        )
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"].numpy())
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"].numpy())
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_loads_with_original_logits_and_is_cached(tmp_path, cache):
    tok = tiny_tokenizer()
    original = tiny_llama(len(tok), seed=3)
    for layer in original.model.layers:  # RMSNorm weights start at 1; make them matter
        torch.nn.init.uniform_(layer.input_layernorm.weight, 0.5, 1.5)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, original, tok)
    text = "<|im_start|>user\nthe cat sat<|im_end|>\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = original(ids).logits
    for attempt in ("first load, de-quantise", "second load, from the cache"):
        model, loaded_tok = models.load_model(str(path))
        assert loaded_tok(text, add_special_tokens=False)["input_ids"] == ids[0].tolist(), attempt
        assert (
            loaded_tok.eos_token_id == tok.eos_token_id
            and loaded_tok.chat_template == tok.chat_template
        )
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, atol=1e-4, rtol=1e-4, msg=attempt)
        assert (models.gguf_cache_path(path) / "config.json").is_file()


def test_local_directory_and_errors(tmp_path, monkeypatch):
    directory = tiny_model_dir(tmp_path / "m")
    model, tok = models.load_model(str(directory))
    assert model.config.vocab_size == len(tok) and not model.training
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        models.load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # read at import; the env var is too late
    with pytest.raises(OSError, match="hub id"):
        models.load_model("no-such-org/no-such-model-lmoe")


@pytest.mark.slow
def test_builtin_smollm2_loads_and_answers():
    model, tok = models.load_model()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    from lmoe.evaluation.scoring import generate

    assert generate(model, tok, ["What is the capital of France?"], max_new_tokens=12)[0]
