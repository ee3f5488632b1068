"""`surgery check`: would transformers load this checkpoint as the model its config names? From headers and config.

The class in config.json's `architectures` is built on the meta device (no memory for weights) and offered the
checkpoint's tensors as meta tensors of the same names and shapes, through transformers' own checkpoint key
conversion (renames, per-expert keys merged into fused experts; transformers 5). What it would not load
(unexpected), what it would have to initialise (missing), and what does not fit (mis-shaped, or an integer where it
holds floats) are the problems, each naming the checkpoint's tensor where there is one. Tied weights and the
class's own ignore lists count as transformers counts them. No tensor data is read. Needs torch and transformers,
imported only here.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from .checkpoint import Checkpoint, open_checkpoint
from .errors import SurgeryError
from .extras import torch_and_transformers


class Unavailable(SurgeryError):
    """The check cannot run here: no torch or transformers, or this transformers lacks the model class."""


@dataclass(frozen=True)
class Problem:
    kind: str  # one of KINDS
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.kind:<11} {self.name}: {self.detail}"


@dataclass(frozen=True)
class ConsumerCheck:
    """The outcome: which class of which transformers version was asked, how many tensors, what does not fit."""

    location: str
    model_class: str
    transformers_version: str
    tensors: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        counts = Counter(p.kind for p in self.problems)
        found = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return f"{self.location}: {self.model_class} (transformers {self.transformers_version}) " + (
            f"loads all {self.tensors} tensors" if self.ok else f"would not load it as written: {found}"
        )

    def document(self) -> dict:
        """The `--json` form."""
        return {"command": "check", "path": self.location, "model_class": self.model_class,
                "transformers": self.transformers_version, "tensors": self.tensors, "ok": self.ok,
                "problems": [{"kind": p.kind, "name": p.name, "detail": p.detail} for p in self.problems]}


#: the kinds of problem, in the order they are listed: what the checkpoint holds that does not fit comes first
KINDS = ("unexpected", "mis-shaped", "dtype", "missing")
#: the safetensors dtypes by kind, for telling an integer tensor from a float one
_KIND = {"BOOL": "bool", **dict.fromkeys(("U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"), "integer")}


def check_consumer(source: str | os.PathLike | Checkpoint) -> ConsumerCheck:
    """Check `source` (a folder, a .safetensors file or an opened checkpoint) against its config's model class."""
    checkpoint = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    torch, transformers = _libraries()
    config, model_class = _model_class(checkpoint, transformers)
    with torch.device("meta"):
        model = model_class(config)
    offered = {name: torch.empty(info.shape, dtype=_meta_dtype(torch, info.dtype), device="meta")
               for name, info in checkpoint.tensors.items()}
    loader = _convert_and_load(transformers)
    try:
        problems = loader(model, offered, checkpoint) if loader else _compare_state_dicts(model, offered, checkpoint)
    except (TypeError, AttributeError, ValueError) as exc:  # the private loading API of another transformers
        raise Unavailable(f"transformers {transformers.__version__}'s loader is not the one this check knows: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    order = sorted(problems, key=lambda p: (KINDS.index(p.kind), p.name))
    return ConsumerCheck(str(checkpoint.location), model_class.__name__, transformers.__version__,
                         len(checkpoint.tensors), tuple(order))


def _model_class(checkpoint: Checkpoint, transformers) -> tuple[object, type]:
    """The config object and the model class that config.json names."""
    config = dict(checkpoint.config)
    where = f"{checkpoint.location}: config.json"
    architecture = (config.get("architectures") or [None])[0]
    if not config.get("model_type") or not architecture:
        raise SurgeryError(f"{where} names no model_type or architectures, so no model class to check against")
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise Unavailable(f"transformers {transformers.__version__} has no model class {architecture}: "
                          "cannot check (a newer transformers may have it)")
    try:
        return transformers.AutoConfig.for_model(**config), model_class
    except (ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"transformers {transformers.__version__} cannot read {where}: "
                          f"{' '.join(str(exc).split())[:300]}") from None


def _convert_and_load(transformers):
    """transformers 5's loader, offered meta tensors (its checkpoint key conversion included); None before 5."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, convert_and_load_state_dict_in_model,
                                                     rename_source_key)
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None

    def load(model, offered: dict, checkpoint: Checkpoint) -> list[Problem]:
        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        expected = model.state_dict()
        origins = defaultdict(list)  # the model's name -> the checkpoint names that feed it
        for name in offered:
            renamed, _ = rename_source_key(name, renamings, converters, model.base_model_prefix, expected)
            origins[renamed].append(name)
        config = LoadStateDictConfig(weight_mapping=mapping, device_map={"": "meta"})
        info, _ = convert_and_load_state_dict_in_model(model, offered, config)
        model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
        model._adjust_missing_and_unexpected_keys(info)
        return _problems(checkpoint, expected, origins, info.missing_keys - set(info.conversion_errors),
                         info.unexpected_keys, {m[0]: m[2] for m in info.mismatched_keys}, info.conversion_errors)

    return load


def _compare_state_dicts(model, offered: dict, checkpoint: Checkpoint) -> list[Problem]:
    """transformers 4: the checkpoint's names (after the class's own renames and prefix) against the model's."""
    expected = model.state_dict()
    renames = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    prefix = model.base_model_prefix
    origins = defaultdict(list)
    for name in offered:
        renamed = name
        for pattern, replacement in renames.items():
            renamed = re.sub(pattern, replacement, renamed)
        if renamed not in expected and f"{prefix}.{renamed}" in expected:
            renamed = f"{prefix}.{renamed}"
        origins[renamed].append(name)
    loaded = {k for k in origins if k in expected}
    missing = set(expected) - loaded - _tied(model)
    unexpected = set(origins) - set(expected)
    for ignored, names in (("missing", missing), ("unexpected", unexpected)):
        for pattern in getattr(model, f"_keys_to_ignore_on_load_{ignored}", None) or ():
            names -= {k for k in names if re.search(pattern, k)}
    mis_shaped = {k: expected[k].shape for k in loaded if offered[origins[k][0]].shape != expected[k].shape}
    return _problems(checkpoint, expected, origins, missing, unexpected, mis_shaped, {})


def _tied(model) -> set[str]:
    """Names transformers 4 fills by tying (lm_head.weight to the embeddings) when the config ties them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return set(getattr(model, "_tied_weights_keys", None) or ())


def _problems(checkpoint: Checkpoint, expected: dict, origins: dict, missing: set, unexpected: set,
              mis_shaped: dict, conversion_errors: dict) -> list[Problem]:
    """Problems named by the checkpoint's tensors where the model's name has one, else by the model's name."""
    tensors = checkpoint.tensors
    problems = [Problem("missing", k, f"{_shape(expected[k].shape)} expected, not in the checkpoint") for k in missing]
    for name in unexpected:
        for origin in origins.get(name, [name]):
            info = tensors.get(origin)
            found = f"{_shape(info.shape)} {info.dtype}" if info else "(from the checkpoint)"
            problems.append(Problem("unexpected", origin, f"{found}, which the model has no place for"))
    for name, wanted in mis_shaped.items():
        for origin in origins.get(name, [name]):
            info = tensors.get(origin)
            if info is not None:
                into = "" if origin == name else f" (merged into {name})" if len(origins[name]) > 1 else f" ({name})"
                problems.append(Problem("mis-shaped", origin, f"{_shape(info.shape)}, expected {_shape(wanted)}{into}"))
    for name in conversion_errors:
        problems += _unmergeable(name, origins.get(name, []), tensors, conversion_errors[name])
    for name, origin_names in origins.items():
        if name in expected and name not in mis_shaped:
            problems += _dtype_problems(name, origin_names, tensors, expected[name])
    return problems


def _unmergeable(target: str, origin_names: list[str], tensors: dict, error: str) -> list[Problem]:
    """Checkpoint tensors that transformers could not merge into `target`: those whose shape differs from most."""
    shapes = Counter(tuple(tensors[n].shape) for n in origin_names if n in tensors)
    if len(shapes) > 1:
        usual = shapes.most_common(1)[0][0]
        return [Problem("mis-shaped", n, f"{_shape(tensors[n].shape)}, the others merged into {target} are "
                                         f"{_shape(usual)}") for n in origin_names if tuple(tensors[n].shape) != usual]
    last = next((line.strip() for line in reversed(error.splitlines()) if line.strip()), "conversion failed")
    return [Problem("mis-shaped", target, f"cannot be built from {len(origin_names)} checkpoint tensors: {last[:200]}")]


def _dtype_problems(name: str, origin_names: list[str], tensors: dict, parameter) -> list[Problem]:
    """An integer or bool tensor where the model holds floats, or the other way round."""
    wanted = "float" if parameter.is_floating_point() else "bool" if str(parameter.dtype) == "torch.bool" else "integer"
    out = []
    for origin in origin_names:
        info = tensors.get(origin)
        if info is not None and _KIND.get(info.dtype, "float") != wanted:
            held = str(parameter.dtype).removeprefix("torch.")
            out.append(Problem("dtype", origin, f"{info.dtype}, expected {wanted} values (the model holds {held})"))
    return out


def _meta_dtype(torch, dtype: str):
    kind = _KIND.get(dtype, "float")
    return {"float": torch.float32, "integer": torch.int64, "bool": torch.bool}[kind]


def _shape(shape) -> str:
    return f"[{', '.join(str(d) for d in shape)}]"


def _libraries() -> tuple[object, object]:
    return torch_and_transformers("checking", Unavailable)
