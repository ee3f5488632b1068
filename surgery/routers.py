"""Router rows from prompts: mergekit-moe's gate modes, computed layer by layer in bounded memory.

For each expert, its positive prompts' mean state minus its negative prompts' (when it has some), L2-normalised per
layer, as mergekit-moe does (mergekit/moe/router.py):

- `cheap_embed`: the sum of the prompts' token embeddings over the tokens that are not padding, normalised, the
  same row for every layer (no forward pass; needs the tokenizer, not torch);
- `hidden` and `hidden_last`: the last token's hidden state, `hidden_avg`: the mean over every position (left
  padding included), averaged over the prompts; the state is the residual stream entering each layer
  (`output_hidden_states[:-1]`), or with `router_input="mlp"` the input of the layer's MLP, what its router sees.

Prompts are tokenized as mergekit does: the base's tokenizer, its BOS token prepended as text, no other special
tokens, padded on the left with BOS (or EOS). The hidden modes never load the model: for each layer, a one-layer
transformers model of the base's config is loaded with that layer's weights and the embedding rows of the prompts'
tokens, run on the residual stream the previous layer left, and freed. Peak memory is one layer plus activations.
Computed in bf16 like mergekit (or `compute_dtype="F32"`), reduced in float32. torch and transformers are imported
here only; the random gate modes need neither (rule files draw them).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dtypes
from .checkpoint import Checkpoint, TensorInfo
from .errors import SurgeryError, first_line, os_error
from .extras import INSTALL, torch_and_transformers
from .header import build_header

HIDDEN_MODES = ("hidden", "hidden_avg", "hidden_last")
#: gate modes whose router rows come from prompts (the others are drawn by the rule file)
FROM_PROMPTS = ("cheap_embed", *HIDDEN_MODES)
ROUTER_INPUTS = ("residual", "mlp")
#: names of the rows in the routers checkpoint that rule files read (`{tensor: ..., source: routers}`)
ROUTER = "model.layers.{layer}.router"
SHARED_ROUTER = "model.layers.{layer}.shared_router"
#: smallest norm a row is divided by (mergekit's clamp)
EPSILON = 1e-8
_LAYER = re.compile(r"^(?P<stem>.*\blayers)\.(?P<layer>\d+)\.")
_TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclass(frozen=True)
class Prompts:
    """What one expert should be routed: example prompts, and optionally prompts it should not get."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Batch:
    """One prompt list, tokenized and left-padded: ids [B, T] and attention mask [B, T]."""

    ids: np.ndarray
    mask: np.ndarray


def router_rows(base: Checkpoint, experts: Sequence[Prompts], mode: str, *, router_input: str = "residual",
                compute_dtype: str = "BF16", progress: bool = False) -> np.ndarray:
    """Router rows [layers, len(experts), hidden_size] (float32) for gate mode `mode`, from `base`'s tokenizer and
    weights; see the module docstring for the definitions."""
    if mode not in FROM_PROMPTS:
        raise SurgeryError(f"gate mode {mode!r} does not come from prompts (those are {', '.join(FROM_PROMPTS)})")
    if router_input not in ROUTER_INPUTS or (router_input != "residual" and mode not in HIDDEN_MODES):
        raise SurgeryError(f"router input {router_input!r} applies to the hidden gate modes only "
                           f"(choices: {', '.join(ROUTER_INPUTS)})")
    for i, prompts in enumerate(experts):
        if not prompts.positive:
            raise SurgeryError(f"expert {i} has no positive prompts: gate mode {mode} needs at least one")
    tokenizer = load_tokenizer(base)
    lists = [p for prompts in experts for p in (prompts.positive, prompts.negative) if p]
    batches = [_tokenize(tokenizer, list(p), base) for p in lists]
    embed = embedding_tensor(base)
    if mode == "cheap_embed":
        states = np.stack([_normalise(_embedding_sum(base, embed, b)) for b in batches])[:, None, :]
        states = np.repeat(states, _layer_count(base), axis=1)
    else:
        states = _hidden_states(base, embed, batches, mode, router_input, compute_dtype, progress)
    rows, at = [], 0
    for prompts in experts:
        row = states[at]
        if prompts.negative:
            row = row - states[at + 1]
        at += 2 if prompts.negative else 1
        rows.append(_normalise(row))
    return np.stack(rows, axis=1).astype(np.float32)


def write_routers(folder: str | Path, rows: np.ndarray, dtype: str, shared: np.ndarray | None = None) -> Path:
    """Write `rows` [layers, E, H] (and `shared` [layers, 1, H]) rounded once to `dtype` as the routers checkpoint
    rule files read: `model.layers.{layer}.router` (and `.shared_router`) in `folder`/model.safetensors."""
    entries, blobs = [], []
    for layer in range(rows.shape[0]):
        for name, values in ((ROUTER, rows), (SHARED_ROUTER, shared)):
            if values is not None:
                blob = dtypes.encode(values[layer], dtype)
                entries.append((name.format(layer=layer), dtype, tuple(values.shape[1:]), len(blob)))
                blobs.append(blob)
    path = Path(folder) / "model.safetensors"
    try:
        with open(path, "wb") as f:
            f.write(build_header(entries, {"format": "pt"}))
            for blob in blobs:
                f.write(blob)
    except OSError as exc:
        raise os_error(exc, path) from None
    return path


def load_tokenizer(base: Checkpoint) -> object:
    """The base's tokenizer (transformers' AutoTokenizer), set up as mergekit-moe does: left padding with BOS, or
    EOS where there is no BOS."""
    transformers = _transformers()
    if not any(name.startswith("tokenizer") for name in base.side_files):
        raise SurgeryError(f"{base.location} has no tokenizer files: the gate modes from prompts need the base's "
                           "tokenizer")
    folders = {base.files.fetch(name).parent for name in [*base.side_files, "config.json"]}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folders.pop()))
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"{base.location}: transformers cannot load its tokenizer ({first_line(exc)})") from None
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def embedding_tensor(base: Checkpoint) -> TensorInfo:
    """The input embedding: the one tensor of shape [vocab_size, hidden_size] whose name says `embed`."""
    shape = (base.config.get("vocab_size"), base.config.get("hidden_size"))
    found = [t for t in base.tensors.values() if t.shape == shape and "embed" in t.name]
    if len(found) != 1:
        raise SurgeryError(f"{base.location}: no single embedding tensor of shape {list(shape)} whose name says "
                           f"'embed' (found {', '.join(t.name for t in found) or 'none'})")
    return found[0]


def _tokenize(tokenizer: object, prompts: list[str], base: Checkpoint) -> _Batch:
    bos = tokenizer.bos_token or ""
    try:
        encoded = tokenizer([bos + p for p in prompts], return_tensors="np", padding=True, add_special_tokens=False)
    except ValueError as exc:
        raise SurgeryError(f"{base.location}: cannot tokenize the prompts ({first_line(exc)})") from None
    ids, mask = np.asarray(encoded["input_ids"], dtype=np.int64), np.asarray(encoded["attention_mask"])
    vocab = base.config.get("vocab_size")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise SurgeryError(f"{base.location}: the tokenizer gives token id {int(ids.max())}, past the vocabulary "
                           f"({vocab})")
    return _Batch(ids, mask)


def _embedding_sum(base: Checkpoint, embed: TensorInfo, batch: _Batch) -> np.ndarray:
    """cheap_embed's state of a prompt list: the sum of its tokens' embeddings, padding left out."""
    tokens, counts = np.unique(batch.ids[batch.mask.astype(bool)], return_counts=True)
    rows = _rows(base, embed, tokens).astype(np.float64)
    return (rows * counts[:, None]).sum(axis=0)


def _rows(base: Checkpoint, info: TensorInfo, tokens: np.ndarray) -> np.ndarray:
    """Rows `tokens` of a matrix, read one by one (never the whole embedding), as float32."""
    width = info.nbytes // info.shape[0]
    with open(base.files.fetch(info.file), "rb") as f:
        raw = b"".join(_pread(f, info.offset + int(t) * width, width) for t in tokens)
    return dtypes.decode(raw, info.dtype).reshape(len(tokens), info.shape[1])


def _pread(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise SurgeryError(f"{f.name}: ends before byte {offset + size}")
    return data


def _normalise(values: np.ndarray) -> np.ndarray:
    """Each row (last axis) divided by its L2 norm, at least EPSILON."""
    norm = np.linalg.norm(values, axis=-1, keepdims=True)
    return values / np.maximum(norm, EPSILON)


def _layer_stem(base: Checkpoint) -> str:
    """The prefix of the decoder layers' tensor names (`model.layers`): one for the whole checkpoint."""
    stems = {m["stem"] for name in base.tensors if (m := _LAYER.match(name))}
    if len(stems) != 1:
        raise SurgeryError(f"{base.location}: cannot tell its decoder layers (tensor name prefixes before a layer "
                           f"number: {', '.join(sorted(stems)) or 'none'})")
    return stems.pop()


def _layer_count(base: Checkpoint) -> int:
    stem = _layer_stem(base)
    return 1 + max(int(m["layer"]) for name in base.tensors if (m := _LAYER.match(name)) and m["stem"] == stem)


def _hidden_states(base: Checkpoint, embed: TensorInfo, batches: list[_Batch], mode: str, router_input: str,
                   compute_dtype: str, progress: bool) -> np.ndarray:
    """[batches, layers, hidden] float32: each batch's reduced state at every layer, one layer in memory at a time."""
    torch, _ = _libraries()
    from tqdm.auto import tqdm

    layers, stem = _layer_count(base), _layer_stem(base)
    tokens = np.unique(np.concatenate([b.ids.reshape(-1) for b in batches]))
    rows = torch.from_numpy(_rows(base, embed, tokens))
    inputs = [(torch.from_numpy(np.searchsorted(tokens, b.ids)), torch.from_numpy(b.mask)) for b in batches]
    out = np.zeros((len(batches), layers, base.config["hidden_size"]), dtype=np.float32)
    residual: list[object] = [None] * len(batches)  # the stream entering the current layer (None: the embeddings)
    runs = layers if router_input == "mlp" else max(layers - 1, 1)
    for layer in tqdm(range(runs), desc="routers", unit="layer", disable=not progress):
        model = _layer_model(base, stem, layer, embed.name, rows, compute_dtype)
        for b, (ids, mask) in enumerate(inputs):
            entering, leaving, mlp_input = _run_layer(model, ids, mask, residual[b])
            out[b, layer] = _reduce(mlp_input if router_input == "mlp" else entering, mode)
            residual[b] = leaving
        del model
        gc.collect()
    if router_input == "residual" and layers > 1:
        for b in range(len(batches)):
            out[b, layers - 1] = _reduce(residual[b], mode)
    return out


def _reduce(state: object, mode: str) -> np.ndarray:
    """A batch's state [B, T, H] -> [H]: the last token's (hidden, hidden_last) or the mean over positions
    (hidden_avg, padding included), then the mean over prompts."""
    state = state.float()
    token = state.mean(dim=1) if mode == "hidden_avg" else state[:, -1, :]
    return token.mean(dim=0).numpy()


def _run_layer(model: object, ids: object, mask: object, residual: object | None) -> tuple[object, object, object]:
    """Run the one-layer model on a batch, with `residual` (when given) as the stream entering its decoder layer;
    returns that stream, the layer's output and its MLP's input."""
    torch, _ = _libraries()
    layer = _decoder_layer(model)
    seen: dict[str, object] = {}

    def entering(_module, args, kwargs):
        if residual is not None:
            args, kwargs = _replace_first(args, kwargs, residual)
        seen["entering"] = args[0] if args else kwargs["hidden_states"]
        return args, kwargs

    def leaving(_module, _args, _kwargs, output):
        seen["leaving"] = output[0] if isinstance(output, tuple) else output

    def mlp(_module, args, kwargs):
        seen["mlp"] = args[0] if args else next(iter(kwargs.values()))

    with _hooks((layer.register_forward_pre_hook(entering, with_kwargs=True),
                 layer.register_forward_hook(leaving, with_kwargs=True),
                 _mlp(layer).register_forward_pre_hook(mlp, with_kwargs=True))), torch.no_grad():
        # no cache: one pass needs none, and a one-layer model of a linear-attention layer (Qwen3.5) cannot size one
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return seen["entering"], seen["leaving"], seen["mlp"]


def _replace_first(args: tuple, kwargs: dict, value: object) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


@contextmanager
def _hooks(handles: tuple) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _decoder_layer(model: object) -> object:
    torch, _ = _libraries()
    lists = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)]
    if len(lists) != 1 or len(lists[0]) != 1:
        raise SurgeryError(f"cannot find the decoder layer of {type(model).__name__}")
    return lists[0][0]


def _mlp(layer: object) -> object:
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise SurgeryError(f"{type(layer).__name__} has no `mlp` module whose input the routers could read")
    return mlp


def _layer_model(base: Checkpoint, stem: str, layer: int, embed: str, rows: object, compute_dtype: str) -> object:
    """A one-layer model of `base`'s config holding layer `layer`'s weights (as layer 0) and, as its whole
    vocabulary, the embedding rows of the prompts' tokens."""
    torch, transformers = _libraries()
    config = _layer_config(base.config, layer, vocab=rows.shape[0])
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise SurgeryError(f"{base.location}: transformers has no model class {architecture!r}")
    prefix = f"{stem}.{layer}."
    state = {f"{stem}.0.{name[len(prefix):]}": _tensor(base, info)
             for name, info in base.tensors.items() if name.startswith(prefix)}
    state[embed] = rows
    model, info = model_class.from_pretrained(
        None, config=transformers.AutoConfig.for_model(**config), state_dict=state,
        dtype=getattr(torch, _TORCH_DTYPES[compute_dtype]), output_loading_info=True,
    )
    unused = [*info.get("unexpected_keys", ()), *info.get("mismatched_keys", ()),
              *(k for k in info.get("missing_keys", ()) if ".layers." in k)]
    if unused:
        raise SurgeryError(f"{base.location}: layer {layer}'s weights do not fit a one-layer {architecture} "
                           f"({', '.join(map(str, unused[:3]))})")
    return model.eval()


def _layer_config(config: dict, layer: int, vocab: int) -> dict:
    """The config of a one-layer model of layer `layer`: lists with one entry per layer cut to its entry, and a
    vocabulary of `vocab` tokens (no special token ids)."""
    layers = config["num_hidden_layers"]
    out = {k: v[layer:layer + 1] if isinstance(v, list) and len(v) == layers else v for k, v in config.items()}
    out.update(num_hidden_layers=1, vocab_size=vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return out


def _tensor(base: Checkpoint, info: TensorInfo) -> object:
    """A source tensor read into memory (no mmap), as torch."""
    torch, _ = _libraries()
    if info.dtype not in _TORCH_DTYPES:
        raise SurgeryError(f"{base.location}: {info.name} is {info.dtype}; the hidden gate modes read float weights")
    if not info.nbytes:
        return torch.empty(info.shape, dtype=getattr(torch, _TORCH_DTYPES[info.dtype]))
    raw = bytearray(info.nbytes)
    with open(base.files.fetch(info.file), "rb") as f:
        f.seek(info.offset)
        if f.readinto(raw) != info.nbytes:
            raise SurgeryError(f"{f.name}: ends inside tensor {info.name}")
    return torch.frombuffer(raw, dtype=getattr(torch, _TORCH_DTYPES[info.dtype])).reshape(info.shape)



def _transformers() -> object:
    try:
        import transformers
    except ImportError:
        raise SurgeryError(f"gate modes from prompts need transformers (for the base's tokenizer): {INSTALL}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _libraries() -> tuple[object, object]:
    return torch_and_transformers("the hidden gate modes (the base's layers run on the prompts)")
