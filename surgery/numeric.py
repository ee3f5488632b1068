"""`surgery verify --numeric`: does the output compute what the recipe promises? Checked layer by layer.

For each layer, the source's module and the output's module that the rule file's `numeric_check` names (the dense
MLP and the MoE block) are built by transformers in a one-layer model of each config, loaded with that layer's
weights only, and run in fp32 on the same random hidden states. Peak memory is about one layer; the models are
never loaded whole. Needs torch and transformers (`pip install "weight-surgery[verify]"`), imported only here.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

from .checkpoint import Checkpoint, open_checkpoint
from .errors import SurgeryError, first_line
from .expressions import render
from .extras import torch_and_transformers
from .plan import Plan, fill
from .rules import NumericCheck, compile_pattern

#: largest relative difference (max |output - dense| / max |dense|) of a layer that counts as the same function
TOLERANCE = 1e-5
#: hidden states per check: one sequence of this many tokens
TOKENS = 64


@dataclass(frozen=True)
class LayerCheck:
    layer: int
    difference: float

    @property
    def same(self) -> bool:
        return self.difference <= TOLERANCE


def check_numeric(plan: Plan, dst: str | os.PathLike, progress: Callable[[int], None] = lambda n: None
                  ) -> list[LayerCheck]:
    """Compare each layer's module of the source and of `dst`; raise SurgeryError where `plan` calls the recipe
    exact and a layer differs. `progress` is called once per layer checked."""
    check = _numeric_check(plan)
    torch, transformers = _libraries()
    output = open_checkpoint(dst)
    results = []
    for layer in checked_layers(plan):
        names = {**plan.source.config, **plan.params, "layer": layer}
        hidden = torch.randn(1, TOKENS, plan.source.config["hidden_size"],
                             generator=torch.Generator().manual_seed(layer))
        expected = _run(plan.source, fill(check.source, names, "numeric_check.source"), layer, {}, names, hidden)
        got = _sum(output, [fill(t, names, "numeric_check.target") for t in check.target], layer, check.config, names,
                   hidden)
        scale = expected.abs().max().item() or 1.0
        results.append(LayerCheck(layer, (got - expected).abs().max().item() / scale))
        progress(1)
    verdict, why = plan.exact
    failed = [r for r in results if not r.same]
    if verdict and failed:
        worst = max(failed, key=lambda r: r.difference)
        raise SurgeryError(
            f"{dst}: layer {worst.layer} differs from the source by {worst.difference:.3g} (relative; {len(failed)} "
            f"of {len(results)} layers over {TOLERANCE:g}), but the recipe is exact ({why})"
        )
    return results


def _sum(checkpoint: Checkpoint, prefixes: list[str], layer: int, edits: dict, names: dict, hidden: object) -> object:
    """The summed outputs of the modules at `prefixes` that the checkpoint holds (a shared MLP may be left out)."""
    held = [p for p in prefixes if any(name.startswith(p + ".") for name in checkpoint.tensors)]
    if not held:
        raise SurgeryError(f"{checkpoint.location}: no tensors under {' or '.join(prefixes)}")
    return sum(_run(checkpoint, prefix, layer, edits, names, hidden) for prefix in held)


def _run(checkpoint: Checkpoint, prefix: str, layer: int, edits: dict, names: dict, hidden: object) -> object:
    """The output of the module at `prefix` of layer `layer` for `hidden`; the module is freed before returning,
    so only one is in memory at a time."""
    torch, _ = _libraries()
    module = _module(checkpoint, prefix, layer, edits, names)
    with torch.no_grad():
        result = _first(module(hidden))
    del module
    gc.collect()
    return result


def _module(checkpoint: Checkpoint, prefix: str, layer: int, edits: dict, names: dict) -> object:
    """The module at `prefix` of layer `layer`, in a one-layer model of the checkpoint's config holding that
    layer's weights (renumbered to layer 0)."""
    _, transformers = _libraries()
    config = _one_layer_config(checkpoint.config, layer, edits, names)
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise SurgeryError(f"{checkpoint.location}: transformers has no model class {architecture!r}")
    local = prefix.replace(f".{layer}.", ".0.", 1)
    state = {name.replace(prefix, local, 1): tensor for name, tensor in _tensors(checkpoint, prefix + ".")}
    if not state:
        raise SurgeryError(f"{checkpoint.location}: no tensors under {prefix}")
    numel = sum(t.numel() for t in state.values())
    try:
        model = _load(model_class, {**config, **_TINY_ATTENTION}, state)
    except (ValueError, RuntimeError):  # a model that ties its attention shape to the hidden size
        try:
            model = _load(model_class, config, state)
        except (ValueError, RuntimeError, TypeError, KeyError, AttributeError) as exc:
            raise SurgeryError(
                f"{checkpoint.location}: transformers {transformers.__version__} cannot build a one-layer "
                f"{architecture} to check layer {layer} ({first_line(exc)})"
            ) from None
    del state
    return _find(model, local, numel).eval()


# Attention is not run by the check: a tiny one keeps its weights out of memory where the model allows it.
_TINY_ATTENTION = {"num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2}


def _load(model_class: type, config: dict, state: dict) -> object:
    """A `model_class` of `config` holding `state` (missing weights initialised), in float32."""
    torch, transformers = _libraries()
    return model_class.from_pretrained(
        None, config=transformers.AutoConfig.for_model(**config), state_dict=state, dtype=torch.float32
    )


def _find(model: object, path: str, numel: int) -> object:
    """The module at `path` (a checkpoint prefix); where transformers names it otherwise (Mixtral's
    `block_sparse_moe` is `mlp` in transformers 5), the one sibling holding exactly the loaded elements."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        parent = model.get_submodule(path.rpartition(".")[0])
    found = [m for _, m in parent.named_children() if sum(p.numel() for p in m.parameters()) == numel]
    if len(found) != 1:
        raise SurgeryError(f"no single module of {type(parent).__name__} holds the weights under {path}")
    return found[0]


def _one_layer_config(config: dict, layer: int, edits: dict, names: dict) -> dict:
    """The config for one layer: lists with one entry per layer cut to this layer's, a tiny vocabulary (no
    special token ids), and the rule file's `numeric_check.config` edits for this layer."""
    layers = config["num_hidden_layers"]
    out = {k: v[layer:layer + 1] if isinstance(v, list) and len(v) == layers else v for k, v in config.items()}
    out.update(num_hidden_layers=1, vocab_size=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    out.update(render(edits, names, "numeric_check.config"))
    return out


def _tensors(checkpoint: Checkpoint, prefix: str):
    """(name, torch tensor) for each tensor of `checkpoint` under `prefix`, read from its shard."""
    from safetensors import safe_open

    for name, info in checkpoint.tensors.items():
        if name.startswith(prefix):
            with safe_open(checkpoint.files.fetch(info.file), framework="pt") as f:
                yield name, f.get_tensor(name)


def checked_layers(plan: Plan) -> list[int]:
    """The layers `check_numeric` compares: those holding the rule file's `numeric_check.source` module."""
    pattern = compile_pattern(_numeric_check(plan).source + ".{rest:*}")
    return sorted({int(m["layer"]) for name in plan.source.tensors if (m := pattern.fullmatch(name))})


def _numeric_check(plan: Plan) -> NumericCheck:
    if plan.rules.numeric_check is None:
        raise SurgeryError(f"rule file {plan.rules.name} has no numeric_check: it does not say which modules to compare")
    return plan.rules.numeric_check


def _first(result: object) -> object:
    return result[0] if isinstance(result, tuple) else result


def _libraries() -> tuple[object, object]:
    return torch_and_transformers("verify --numeric")
