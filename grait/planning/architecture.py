"""A decoder's shape, read from its `config.json`: parameter counts and FLOPs per token.

The planner works from the shape alone, so it can size an 8B job in the API process without
loading a weight (or torch). Llama-style blocks (the families users tune: Llama, Mistral,
Qwen, SmolLM) are modelled exactly; other families fall back to the same formulas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grait.config import ALL_LINEAR as BLOCK_LINEARS  # a block's linears, by LoRA target name

# Llama-3-8B's shape (the paper's larger model): the GPU script builds it with random weights,
# and the tests plan it.
LLAMA3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: int

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> Architecture:
        """From a Hugging Face config dict (Llama key names; GPT-style aliases accepted)."""

        def key(*names: str, default: Any = None) -> Any:
            for name in names:
                if raw.get(name) is not None:
                    return raw[name]
            if default is None:
                raise ValueError(f"model config has none of {names}")
            return default

        hidden = int(key("hidden_size", "n_embd", "d_model"))
        heads = int(key("num_attention_heads", "n_head"))
        return cls(
            hidden=hidden,
            layers=int(key("num_hidden_layers", "n_layer", "num_layers")),
            heads=heads,
            kv_heads=int(key("num_key_value_heads", default=heads)),
            intermediate=int(key("intermediate_size", "n_inner", default=4 * hidden)),
            vocab=int(key("vocab_size")),
            tied_embeddings=bool(raw.get("tie_word_embeddings", False)),
            head_dim=int(key("head_dim", default=hidden // heads)),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Architecture:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of one block linear."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }
        if name not in shapes:
            raise ValueError(f"unknown block linear {name!r}; known: {', '.join(shapes)}")
        return shapes[name]

    @property
    def block_linear_params(self) -> int:
        """Weights of the linears in all blocks: what 4/8-bit loading quantises."""
        per_block = sum(i * o for i, o in map(self.linear_shape, BLOCK_LINEARS))
        return self.layers * per_block

    @property
    def embedding_params(self) -> int:
        """Input embedding plus output head (once when tied); kept in 16 bit when quantised."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.block_linear_params + self.embedding_params + norms

    def lora_params(self, rank: int, targets: Iterable[str]) -> int:
        return self.layers * sum(rank * sum(self.linear_shape(t)) for t in targets)

    def max_lora_module_params(self, rank: int, targets: Iterable[str]) -> int:
        """The largest single LoRA factor pair: what streamed features hold per sample."""
        return max(rank * max(self.linear_shape(t)) for t in targets)

    def forward_flops(self, tokens: float, context: float, *, logit_tokens: float) -> float:
        """Matmul FLOPs of a forward over `tokens` tokens at mean attention span `context`.

        2 FLOPs per weight per token in the blocks, 4·d per token per layer per attended
        position (scores and values), and the output head only where logits are taken.
        """
        blocks = 2.0 * self.block_linear_params * tokens
        attention = 4.0 * self.layers * self.heads * self.head_dim * context * tokens
        head = 2.0 * self.vocab * self.hidden * logit_tokens
        return blocks + attention + head

    def kv_cache_bytes(self, tokens: float, dtype_bytes: float) -> float:
        return 2.0 * self.layers * self.kv_heads * self.head_dim * dtype_bytes * tokens

    def activation_bytes_per_token(self, dtype_bytes: float, *, checkpointing: bool) -> float:
        """What a backward pass keeps per token, over all blocks.

        Without checkpointing each block keeps its inputs to every matmul and the MLP's
        intermediate tensors, ~(6·h + 5·ffn) values (attention through SDPA keeps no score
        matrix); with checkpointing only each block's input survives, plus one block being
        recomputed at a time.
        """
        per_block = (6 * self.hidden + 5 * self.intermediate) * dtype_bytes
        if checkpointing:
            return self.layers * self.hidden * dtype_bytes + per_block
        return self.layers * per_block
