"""Shared fixtures: tiny dense models made by transformers, saved in several shards."""

from __future__ import annotations

import pytest

from tests.tiny_models import save_tiny

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16, "rope_theta": 10000.0,
}

#: name -> (kind, config overrides, built-in rule file)
DENSE_MODELS = {
    "mistral-sliding-window": ("mistral", {"sliding_window": 8}, "mistral-to-mixtral"),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, "llama-to-mixtral"),
    "llama-rope-scaling": ("llama", {"rope_parameters": LLAMA3_ROPE}, "llama-to-mixtral"),
}


@pytest.fixture(scope="session")
def dense_models(tmp_path_factory) -> dict:
    """name -> (folder, rule name); each model saved in at least 3 shards."""
    root = tmp_path_factory.mktemp("dense")
    return {
        name: (save_tiny(kind, root / name, shards=3, **overrides), rules)
        for name, (kind, overrides, rules) in DENSE_MODELS.items()
    }


@pytest.fixture(scope="session")
def mistral(dense_models):
    return dense_models["mistral-sliding-window"][0]
