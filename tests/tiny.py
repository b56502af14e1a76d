"""Tiny randomly initialised models of the real architectures, saved with the embedded tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from fanlora.backbone import TOKENIZER_ENV, embedded_gguf
from fanlora.backbone import _converted_dir as converted_dir

VOCAB = 49152


def embedded_dir() -> Path:
    return converted_dir(embedded_gguf())


def make_tiny(path: Path, arch: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """Save a ~2M-parameter random model of ``arch`` plus the embedded tokenizer into ``path``."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    opt = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=512,
    )
    gpt2 = dict(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=layers, n_head=4, n_positions=512)
    builders = {  # arch → (model class, config class, config kwargs)
        "llama": ("LlamaForCausalLM", "LlamaConfig", common),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", common),
        "mistral": ("MistralForCausalLM", "MistralConfig", common),
        "gemma": ("GemmaForCausalLM", "GemmaConfig", {**common, "head_dim": 8}),
        "opt": ("OPTForCausalLM", "OPTConfig", opt),  # not Llama-shaped: needs a module map
        # GPT-2: Conv1D projections (weights stored in x out), Q/K/V packed into one c_attn
        "gpt2": ("GPT2LMHeadModel", "GPT2Config", gpt2),
    }
    model_cls, config_cls, kwargs = builders[arch]
    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(getattr(tf, config_cls)(**kwargs))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.environ.get(TOKENIZER_ENV) or embedded_dir()).save_pretrained(path)
    return path
