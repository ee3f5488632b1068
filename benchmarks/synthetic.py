"""Synthetic dense checkpoints with the shapes of real architectures, streamed to disk in bounded memory.

    from benchmarks.synthetic import write_synthetic
    write_synthetic("/tmp/mistral-2l", layers=2)                 # 1.4 GB of random bf16, HF layout
    write_synthetic("/tmp/mistral-32l", holes=True)              # headers only: data left as holes

    python -m benchmarks.synthetic /tmp/mistral-2l --layers 2 [--arch llama-3-8b] [--holes]

The folder holds `model-0000i-of-0000N.safetensors` shards (greedy split at `shard_size`, as
`save_pretrained` does), `model.safetensors.index.json` (always, even for one shard), `config.json`,
`generation_config.json` and a small `tokenizer_config.json`. Tensor names are those of transformers'
MistralForCausalLM / LlamaForCausalLM. A full 32-layer Mistral-7B has exactly 7,241,732,096 parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

from surgery.header import build_header

#: bytes of random data generated and written at a time: bounds the generator's memory
CHUNK_BYTES = 4 << 20
BF16_BYTES = 2

_COMMON = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    use_cache=True,
    dtype="bfloat16",
)

#: config.json of each architecture, less num_hidden_layers (set from `layers`)
ARCHITECTURES: dict[str, dict] = {
    "mistral-7b": dict(
        _COMMON,
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mixtral-8x7b": dict(
        _COMMON,
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=None,
        rope_theta=1000000.0,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3-8b": dict(
        _COMMON,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rope_scaling=None,
        attention_bias=False,
        mlp_bias=False,
        pretraining_tp=1,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # Qwen3-8B's shapes (hidden 4096, intermediate 12288, vocab 151936, 32/8 heads) under each newer family's
    # model_type and config fields, for the rule files of those families: the MLPs they read are real-sized, the
    # other tensors keep the Llama names of tensor_shapes (they are only copied).
    **{f"{family}-8b": dict(_COMMON, intermediate_size=12288, vocab_size=151936, max_position_embeddings=40960,
                            rope_theta=1000000.0, bos_token_id=151643, eos_token_id=151645, **fields)
       for family, fields in {
           "qwen3_5": dict(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"]),
           "granite": dict(model_type="granite", architectures=["GraniteForCausalLM"], mlp_bias=False,
                           embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                           logits_scaling=16.0),
           "ernie4_5": dict(model_type="ernie4_5", architectures=["Ernie4_5ForCausalLM"], use_bias=False),
           "hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense", architectures=["HunYuanDenseV1ForCausalLM"]),
           "cohere2": dict(model_type="cohere2", architectures=["Cohere2ForCausalLM"], sliding_window=4096),
           "olmo2": dict(model_type="olmo2", architectures=["Olmo2ForCausalLM"]),
       }.items()},
}

_TOKENIZERS = {
    "mistral": dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    add_bos_token=True, add_eos_token=False, legacy=True),
    "mixtral": dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    add_bos_token=True, add_eos_token=False, legacy=True),
    "llama": dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|begin_of_text|>",
                  eos_token="<|end_of_text|>", model_input_names=["input_ids", "attention_mask"]),
    **dict.fromkeys(("qwen3_5_text", "granite", "ernie4_5", "hunyuan_v1_dense", "cohere2", "olmo2"),
                    dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>")),
}


def make_config(arch: str = "mistral-7b", layers: int = 32, overrides: dict | None = None) -> dict:
    """The HF-style config.json of `arch` with `layers` decoder layers (and `overrides`, e.g. for tests)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    return {**ARCHITECTURES[arch], "num_hidden_layers": layers, **(overrides or {})}


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the dense model in transformers' order: (name, shape)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes += [
            (f"{layer}.self_attn.q_proj.weight", (q_rows, hidden)),
            (f"{layer}.self_attn.k_proj.weight", (kv_rows, hidden)),
            (f"{layer}.self_attn.v_proj.weight", (kv_rows, hidden)),
            (f"{layer}.self_attn.o_proj.weight", (hidden, q_rows)),
            *_mlp_shapes(config, layer),
            (f"{layer}.input_layernorm.weight", (hidden,)),
            (f"{layer}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def _mlp_shapes(config: dict, layer: str) -> list[tuple[str, tuple[int, ...]]]:
    """A dense MLP's weights, or (with num_local_experts) a Mixtral block's router and per-expert weights."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    if "num_local_experts" not in config:
        return [(f"{layer}.mlp.gate_proj.weight", (inter, hidden)), (f"{layer}.mlp.up_proj.weight", (inter, hidden)),
                (f"{layer}.mlp.down_proj.weight", (hidden, inter))]
    moe = f"{layer}.block_sparse_moe"
    shapes = [(f"{moe}.gate.weight", (config["num_local_experts"], hidden))]
    for e in range(config["num_local_experts"]):
        shapes += [(f"{moe}.experts.{e}.w1.weight", (inter, hidden)), (f"{moe}.experts.{e}.w2.weight", (hidden, inter)),
                   (f"{moe}.experts.{e}.w3.weight", (inter, hidden))]
    return shapes


def shard_split(shapes: list[tuple[str, tuple[int, ...]]], shard_size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in order, as save_pretrained does; a tensor larger than `shard_size` gets its own shard."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * BF16_BYTES
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_synthetic(
    folder: str | os.PathLike,
    layers: int = 32,
    arch: str = "mistral-7b",
    shard_size: int = 5_000_000_000,
    holes: bool = False,
    seed: int = 0,
    overrides: dict | None = None,
) -> Path:
    """Write a random bf16 checkpoint of `arch` with `layers` layers into `folder` (created) and return it.

    `holes=True` writes headers only and extends each shard to its full size with os.truncate, so the
    data is a hole: the files look complete to a header reader but use almost no disk (for plan benchmarks).
    Otherwise data is random bf16 (magnitudes in [2**-7, 2**-5), random signs; never NaN or inf),
    generated and written CHUNK_BYTES at a time, so memory stays bounded whatever the model size.
    `overrides` replaces config fields (e.g. a small hidden_size for tests).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, layers, overrides)
    shards = shard_split(tensor_shapes(config), shard_size)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    rng = np.random.default_rng(seed)
    for name, shard in zip(names, shards):
        entries = [(t, "BF16", shape, math.prod(shape) * BF16_BYTES) for t, shape in shard]
        header = build_header(entries, {"format": "pt"})
        data_bytes = sum(e[3] for e in entries)
        with open(folder / name, "wb") as f:
            f.write(header)
            if holes:
                f.truncate(len(header) + data_bytes)
            else:
                _write_random_bf16(f, data_bytes, rng)
    total_size = sum(math.prod(shape) * BF16_BYTES for shard in shards for _, shape in shard)
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_size // BF16_BYTES},
        "weight_map": {t: name for name, shard in zip(names, shards) for t, _ in sorted(shard)},
    }
    _write_json(folder / "model.safetensors.index.json", index)
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
    })
    _write_json(folder / "tokenizer_config.json", {
        **_TOKENIZERS[config["model_type"]], "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    })
    return folder


def _write_random_bf16(f, nbytes: int, rng: np.random.Generator) -> None:
    """Append `nbytes` of random bf16 words to `f`, CHUNK_BYTES at a time."""
    for start in range(0, nbytes, CHUNK_BYTES):
        words = rng.integers(0, 1 << 16, size=min(CHUNK_BYTES, nbytes - start) // BF16_BYTES, dtype=np.uint16)
        words &= 0x80FF  # keep the sign, the lowest exponent bit and the 7 mantissa bits
        words |= 0x3C00  # exponent 120 or 121: |x| in [2**-7, 2**-5)
        f.write(words.astype("<u2", copy=False).data)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MB' -> 5e8, '2GiB' -> 2 * 2**30, '1000' -> 1000 (as the surgery CLI)."""
    from surgery.cli import parse_size as cli_parse_size  # click lives there; import only when parsing

    try:
        return cli_parse_size(text)
    except Exception as exc:  # click.BadParameter
        raise argparse.ArgumentTypeError(str(getattr(exc, "message", exc))) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m benchmarks.synthetic")
    parser.add_argument("folder", type=Path, help="output folder (created)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default: 32, the real model)")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mistral-7b", help="shapes to use")
    parser.add_argument("--shard-size", type=parse_size, default="5GB", help="largest shard (default: 5GB)")
    parser.add_argument("--holes", action="store_true", help="headers only; tensor data left as holes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    args = parser.parse_args(argv)
    out = write_synthetic(args.folder, args.layers, args.arch, args.shard_size, args.holes, args.seed)
    index = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]
    print(f"wrote {out}: {index['total_parameters']:,} parameters, {index['total_size']:,} bytes of bf16")


if __name__ == "__main__":
    main()
