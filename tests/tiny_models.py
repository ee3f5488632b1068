"""Tiny dense checkpoints made by transformers itself, saved sharded, for tests."""

from __future__ import annotations

from pathlib import Path

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
)


def save_tiny(kind: str, folder: Path, shards: int = 3, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """Save a randomly initialised tiny causal LM of model_type `kind` ("mistral", "llama", "qwen2", "qwen3", ...)
    in at least `shards` shards."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(kind, **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a mix-up shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.rand_like(p) * 0.5)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=max(1, total // (shards + 1)))
    return Path(folder)
