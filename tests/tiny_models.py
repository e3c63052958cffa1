"""Tiny random-weight models of every supported architecture, built with no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(folder: Path, vocab_size: int = 384) -> int:
    """Train a small BPE on CPython's bundled docs; returns the vocabulary size."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [v for _, v in sorted(topics.items())][:40]
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return int(tok.get_vocab_size())


def tiny_config(arch: str, vocab_size: int) -> object:
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=3, tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common, rope_theta=10000.0)
    if arch == "llama3-rope":
        return tf.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128, "rope_theta": 500000.0})
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gemma3":
        c = dict(common, num_hidden_layers=6, tie_word_embeddings=True)
        return tf.Gemma3TextConfig(**c, head_dim=32, sliding_window=24, query_pre_attn_scalar=32,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                   layer_types=["sliding_attention"] * 5 + ["full_attention"])
    raise ValueError(arch)


ARCHS = ("llama", "llama3-rope", "qwen2", "qwen3", "mistral", "gemma3")


def build_tiny_model(folder: Path, arch: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder)
    cfg = tiny_config(arch, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random norms / biases so that every weight matters in parity tests
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder))
    return folder


def make_llm(folder: Path, num_blocks: int = 256, block_size: int = 16, **kwargs: Any) -> Any:
    """An engine on ``folder`` whose KV pool has exactly ``num_blocks`` blocks."""
    from sparsex import LLM
    from sparsex.kv.paged import KVCache

    probe = LLM(model=str(folder), kv_cache_memory=1 << 20)
    per_block = KVCache.bytes_per_block(probe.spec, block_size, torch.float32)
    llm = LLM(model=str(folder), kv_cache_memory=num_blocks * per_block, block_size=block_size, **kwargs)
    assert llm.engine.pool.num_blocks == num_blocks
    return llm
