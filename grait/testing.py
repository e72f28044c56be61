"""Tiny random models for tests and smoke runs: real architecture, seconds to train.

They use the packaged model's real tokenizer (so prompts and chat templates are the real
ones) with a two-layer network of width 32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grait.config import DEFAULT_BASE_MODEL
from grait.models import load_tokenizer


def make_tiny_model(path: Path, *, seed: int = 0, tokenizer_from: str = DEFAULT_BASE_MODEL) -> Path:
    """Save a tiny random Llama (HF directory) with a real tokenizer; return the path."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    tok = load_tokenizer(tokenizer_from)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_hyperparameters() -> dict[str, Any]:
    """Nested JobConfig groups that make a tiny-model job finish in seconds on CPU."""
    return {
        "knowledge": {"batch_size": 8, "k_samples": 2, "max_new_tokens": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "warmup": {"min_samples": 4, "batch_size": 4},
        "features": {"dim": 64, "sparse_blocks": 4, "batch_size": 8},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "max_length": 256},
        "evaluation": {"max_new_tokens": 6, "batch_size": 8},
    }
