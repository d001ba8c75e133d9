"""The statistics pass: Gram matrices of every linear layer's inputs and the diagonal
Fisher, computed **layer by layer** with ``transformers``' own modules.

How (any decoder-only architecture transformers knows; no name tables):

* The model is built from ``config.json`` with its parameters on the ``meta`` device
  (buffers such as rotary frequencies are real). The decoder layers are the
  ``nn.ModuleList`` holding most parameters; every other parameter is "outside" (the
  embeddings, the final norm, the LM head). Each parameter slot is mapped to its tensor in
  the checkpoint (tied parameters share one tensor).
* The decoder layers are replaced by stubs in the model, and the model's *own* ``forward``
  runs with them: the stubs record what the model passes each layer (attention mask,
  ``position_embeddings`` from its rotary module, position ids, …) and the first layer's
  input (the embeddings, scaled as the model scales them). So the layers are called
  exactly as the whole model calls them, for Llama, Qwen2, Gemma, … alike.
* Layer by layer, one layer's weights are read (``TensorReader``: safetensors, .bin,
  quantized inputs dequantized, LoRA applied), the layer runs on the hidden states of all
  calibration sequences (batch by batch), forward pre-hooks on its ``nn.Linear`` modules
  accumulate ``Σ x xᵀ`` over non-padding tokens in float64, the outputs replace the
  hidden states, and the layer's weights are dropped. The hidden states stay in memory, or
  in a memory-mapped temporary file when larger than ``spill_bytes``.
* Last, the model's forward runs again with the last stub returning the final hidden
  states and the outside weights but the input embedding loaded: final norm, LM head (its
  Gram too, when it is an ``nn.Linear`` whose weight is not tied to the embeddings — a tied
  head is the embedding table, which RegMean must not solve for) and the loss.

Fisher (``kinds`` with ``"fisher"``): the *empirical Fisher on batch gradients* — for each
calibration batch (``batch_size`` sequences) the exact gradient ``g_b`` of the model's mean
LM loss over that batch's predicted tokens, then ``F = mean_b g_b²``. Computed layer by
layer too: the forward pass keeps each layer's input (spilled when large); the loss gives
the gradient of the last hidden states; then in reverse order each layer is loaded, its
forward recomputed under ``torch.enable_grad`` on its stored input and
``torch.autograd.backward(output, grad_output)`` gives the gradient of its parameters
(squared and summed per batch) and of its input (carried down). Tied parameters get the
sum of their uses' gradients before squaring, as ``loss.backward()`` on the whole model.

Memory: one decoder layer (float32) + the calibration hidden states (``n_tokens ×
hidden × 4`` bytes, ×2 while a batch is replaced) + one layer's Grams (float64 while
accumulated, one per distinct input: q/k/v share theirs) + one batch's activations; with
Fisher also the gradients of one layer and of the hidden states.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MergeError
from .calibration import CalibrationTokens
from .store import Statistics, StatisticsWriter

KINDS = ("gram", "fisher")
SPILL_ENV = "MERGESMITH_STATS_SPILL"
HEAD_POSITIONS = 128
"""Predictions per piece of the Fisher pass's head stage: its logits, log-probabilities and
their gradient are ``3 × (HEAD_POSITIONS + 1) × vocab × 4`` bytes."""
DEFAULT_SPILL_BYTES = 2 << 30


# ------------------------------------------------------------------ the skeleton


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules created inside get their parameters on ``meta`` (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied one stays itself
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass
class Slot:
    """One parameter of the skeleton: where it lives and its checkpoint tensor's name."""

    module: nn.Module
    attr: str
    name: str
    shape: tuple[int, ...]


@dataclass
class Skeleton:
    """A model built on ``meta`` with its decoder layers swapped for stubs."""

    model: nn.Module
    config: Any
    layers: list[nn.Module]  # the real decoder layers (meta until loaded)
    layer_slots: list[list[Slot]]
    outside_slots: list[Slot]
    input_embedding: nn.Module | None
    output_embedding: nn.Module | None
    recorder: _Recorder
    tied: set[str] = field(default_factory=set)  # checkpoint names used by several slots

    def first_slots(self) -> list[Slot]:
        """Outside slots the embedding stage needs (all but the LM head's own)."""
        head = self.output_embedding
        return [s for s in self.outside_slots if head is None or not _inside(s.module, head)
                or s.name in self.tied]

    def final_slots(self) -> list[Slot]:
        """Outside slots the head stage needs (all but the input embedding's own)."""
        emb = self.input_embedding
        return [s for s in self.outside_slots if emb is None or not _inside(s.module, emb)]


def _inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


class _StopForward(Exception):
    pass


class _Recorder:
    """What the stubs do: record each layer's call, pass hidden states through."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.mode = "capture"
        self.calls: list[tuple[tuple, dict] | None] = [None] * n_layers
        self.first_input: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self.returns_tuple = False

    def __call__(self, index: int, args: tuple, kwargs: dict) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self.mode == "capture":
            if index == 0:
                self.first_input = hidden
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            self.calls[index] = (tuple(args[1:]), rest)
            if index == self.n_layers - 1:
                raise _StopForward
        elif index == self.n_layers - 1:
            hidden = self.final
        return (hidden,) if self.returns_tuple else hidden


class _Stub(nn.Module):
    def __init__(self, real: nn.Module, index: int, recorder: _Recorder) -> None:
        super().__init__()
        for key, value in vars(real).items():  # attention_type, layer_idx, ... (not modules)
            if not key.startswith("_") and key != "training":
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_recorder", recorder)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._recorder(self._index, args, kwargs)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one with the most parameters."""
    best = None
    for parent_name, parent in model.named_modules():
        for attr, child in parent._modules.items():
            if isinstance(child, nn.ModuleList) and len(child) > 0:
                n = sum(p.numel() for p in child.parameters())
                if best is None or n > best[0]:
                    best = (n, parent, attr, child)
    if best is None:
        raise MergeError("the model has no list of layers (nn.ModuleList)")
    return best[1], best[2], best[3]


def build_skeleton(folder: str, tensor_names: set[str]) -> Skeleton:
    """The model of ``folder``'s config.json on ``meta``, slots mapped to ``tensor_names``
    (the checkpoint's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..evaluate.runner import _quiet_transformers

    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            config.use_cache = False
            with empty_parameters():
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                         dtype=torch.float32)
    except Exception as e:  # unknown architecture, bad config: one line
        raise MergeError(f"{folder}: transformers cannot build this model for the statistics "
                         f"pass: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    parent, attr, layer_list = _layer_list(model)
    layers = list(layer_list)
    # every (module, attr) → all its names (tied parameters have several)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    layer_ids = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    layer_slots: list[list[Slot]] = [[] for _ in layers]
    outside: list[Slot] = []
    used: dict[str, int] = {}
    for mod_name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is None:
                continue
            names = aliases.get(id(p), [f"{mod_name}.{pname}" if mod_name else pname])
            found = next((n for n in names if n in tensor_names), None)
            if found is None:
                raise MergeError(f"{folder}: the checkpoint has no tensor for the model's "
                                 f"parameter {names[0]}")
            slot = Slot(module, pname, found, tuple(p.shape))
            used[found] = used.get(found, 0) + 1
            i = layer_ids.get(id(module))
            (layer_slots[i] if i is not None else outside).append(slot)
    # a slot appears once per module holding it; tied slots in two modules share the name
    tied = {n for n, c in used.items() if c > 1}
    recorder = _Recorder(len(layers))
    stubs = nn.ModuleList([_Stub(layer, i, recorder) for i, layer in enumerate(layers)])
    setattr(parent, attr, stubs)
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    try:
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        out = None
    return Skeleton(model, config, layers, layer_slots, outside, inp, out, recorder, tied)


class WeightLoader:
    """Reads tensors of one model from its checkpoint into skeleton slots."""

    def __init__(self, source: Any, device: torch.device, dtype: torch.dtype) -> None:
        from ..checkpoint import TensorReader

        self.index = source.index if hasattr(source, "index") else source
        self.lora = getattr(source, "lora", None)
        self.reader = TensorReader()
        self.device, self.dtype = device, dtype

    def read(self, name: str) -> torch.Tensor:
        t = self.reader.read(self.index.tensors[name])
        if self.lora is not None:
            t = self.lora.apply(name, t, None)
        return t.to(device=self.device, dtype=self.dtype)

    def load(self, slots: list[Slot], tensors: dict[str, torch.Tensor] | None = None,
             requires_grad: bool = False) -> dict[str, nn.Parameter]:
        """Put tensors into ``slots`` (``tensors`` given by name, else read); tied slots get
        the same Parameter. Returns name → Parameter."""
        params: dict[str, nn.Parameter] = {}
        for s in slots:
            if s.name not in params:
                t = tensors[s.name] if tensors is not None else self.read(s.name)
                t = t.to(device=self.device, dtype=self.dtype)
                params[s.name] = nn.Parameter(t, requires_grad=requires_grad)
            s.module._parameters[s.attr] = params[s.name]
        return params

    def close(self) -> None:
        self.reader.close()


def free(slots: list[Slot]) -> None:
    """Back to ``meta``: the weights' memory is released."""
    for s in slots:
        p = s.module._parameters[s.attr]
        s.module._parameters[s.attr] = nn.Parameter(
            torch.empty(s.shape, dtype=p.dtype, device="meta"), requires_grad=False)


# ------------------------------------------------------------------ hidden states


class HiddenStore:
    """``[n_seq, length, hidden]`` float32: in memory, or in a temporary file (``folder``)
    read and written by rows with ``pread``/``pwrite`` — not memory-mapped, so spilled
    hidden states live in the page cache, not in the process's resident set."""

    def __init__(self, shape: tuple[int, ...], folder: str | None) -> None:
        self.path: str | None = None
        self.shape = tuple(shape)
        self._row = 4
        for d in shape[1:]:
            self._row *= d
        if folder is None:
            self.data: torch.Tensor | None = torch.zeros(shape, dtype=torch.float32)
        else:
            self.data = None
            self._fd, self.path = tempfile.mkstemp(dir=folder, prefix="hidden-", suffix=".f32")
            os.ftruncate(self._fd, self._row * shape[0])

    def _span(self, rows: slice) -> tuple[int, int]:
        start, stop, step = rows.indices(self.shape[0])
        assert step == 1, "hidden states are read and written in runs of whole sequences"
        return start, stop

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if self.data is not None:
            return self.data[rows]
        start, stop = self._span(rows)
        out = torch.empty((stop - start, *self.shape[1:]), dtype=torch.float32)
        view = memoryview(out.numpy()).cast("B")
        done, offset = 0, start * self._row
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{self.path}: short read")
            done += n
        return out

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float32)
        if self.data is not None:
            self.data[rows] = value
            return
        start, stop = self._span(rows)
        view = memoryview(value.contiguous().numpy()).cast("B")
        assert len(view) == (stop - start) * self._row
        done, offset = 0, start * self._row
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def close(self) -> None:
        self.data = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class _Stores:
    """Hands out HiddenStores, spilling to disk once ``limit`` bytes are in memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_memory = limit, 0
        self.folder: str | None = None

    def new(self, shape: tuple[int, ...]) -> HiddenStore:
        nbytes = 4
        for d in shape:
            nbytes *= d
        if self.in_memory + nbytes <= self.limit:
            self.in_memory += nbytes
            return HiddenStore(shape, None)
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="mergesmith-hidden-")
        return HiddenStore(shape, self.folder)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def spill_limit() -> int:
    env = os.environ.get(SPILL_ENV)
    if env:
        from ..units import parse_size

        return parse_size(env, SPILL_ENV)
    return DEFAULT_SPILL_BYTES


# ------------------------------------------------------------------ Grams


_GRAM_ROWS = 512


class GramCollector:
    """Forward pre-hooks on every ``nn.Linear`` of a module: Σ x xᵀ (float64) over the
    tokens whose ``mask`` is 1. Linears fed the same tensor (q/k/v) share one sum."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device) -> None:
        self.linears = linears  # checkpoint weight name → module
        self.device = device
        self.mask: torch.Tensor | None = None
        self.groups: dict[frozenset[str], list] = {}  # names → [gram, tokens]
        self._seen: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if args:
                self._seen[name] = args[0]
        return hook

    def flush(self) -> None:
        """Add the inputs seen since the last flush (one batch through the module)."""
        seen, self._seen = self._seen, {}
        by_input: dict[int, list[str]] = {}
        for name, x in seen.items():
            by_input.setdefault(id(x), []).append(name)
        for names in by_input.values():
            x = seen[names[0]].detach()
            key = frozenset(names)
            if key not in self.groups:  # the grouping of the first batch holds after
                for other in list(self.groups):
                    if other & key:
                        raise MergeError("statistics: linear layers share inputs "
                                         "differently from batch to batch")
            mask = self.mask
            if (mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape)
                    and not bool(mask.all())):
                rows = x[mask.to(x.device).bool()]
            else:
                rows = x.reshape(-1, x.shape[-1])
            entry = self.groups.setdefault(key, [None, 0])
            if entry[0] is None:
                entry[0] = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float64,
                                       device=self.device)
            for start in range(0, rows.shape[0], _GRAM_ROWS):  # float64 copies stay small
                part = rows[start:start + _GRAM_ROWS].to(self.device, torch.float64)
                entry[0].addmm_(part.T, part)
            entry[1] += rows.shape[0]

    def write(self, writer: StatisticsWriter) -> None:
        for names, (gram, tokens) in self.groups.items():
            for name in sorted(names):
                writer.add_gram(name, gram, tokens)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def _linears(module: nn.Module, slots: list[Slot], exclude: set[str]) -> dict[str, nn.Linear]:
    names = {(id(s.module), s.attr): s.name for s in slots}
    out = {}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            name = names.get((id(m), "weight"))
            if name is not None and name not in exclude:
                out[name] = m
    return out


# ------------------------------------------------------------------ the pass


class _HeadGradient:
    """The untied LM head weight's gradient, accumulated in place (``dlogitsᵀ · x`` per
    backward pass) instead of by autograd, which allocates a new vocabulary × hidden
    gradient on every backward and adds it to the one held: one table fewer at the peak."""

    def __init__(self, head: nn.Linear, name: str) -> None:
        self.name, self.weight = name, head.weight
        self.weight.requires_grad_(False)
        self.acc: torch.Tensor | None = None
        self._handle = head.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        x = args[0].detach()

        def backward(g: torch.Tensor) -> None:
            if self.acc is None:
                self.acc = torch.zeros_like(self.weight)
            self.acc.addmm_(g.reshape(-1, g.shape[-1]).T.to(self.acc.dtype),
                            x.reshape(-1, x.shape[-1]).to(self.acc.dtype))

        out.register_hook(backward)

    def take(self) -> torch.Tensor:
        """This batch's gradient (zeros if nothing was predicted); the next starts anew."""
        acc, self.acc = self.acc, None
        return acc if acc is not None else torch.zeros_like(self.weight)

    def close(self) -> None:
        self._handle.remove()
        self.weight = self.acc = None  # type: ignore[assignment]


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """One decoder layer on one batch, called as the model calls it."""
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _sequence_call(value: Any, r: int, size: int) -> Any:
    """A layer call recorded for a batch of ``size`` sequences, for its sequence ``r``
    alone: tensors of two or more dimensions whose first is the batch (attention masks,
    per-sequence position embeddings) sliced; the rest (shared positions, flags) as is."""
    if size == 1:
        return value
    if isinstance(value, torch.Tensor):
        return value[r:r + 1] if value.dim() >= 2 and value.shape[0] == size else value
    if isinstance(value, tuple):
        return tuple(_sequence_call(v, r, size) for v in value)
    if isinstance(value, list):
        return [_sequence_call(v, r, size) for v in value]
    if isinstance(value, dict):
        return {k: _sequence_call(v, r, size) for k, v in value.items()}
    return value


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _signature(mask: torch.Tensor) -> tuple:
    return (tuple(mask.shape), bytes(mask.to(torch.uint8).contiguous().numpy().tobytes()))


@dataclass
class PassResult:
    files: list[str]
    layers: int
    tokens: int


def statistics_pass(source: Any, tokens: CalibrationTokens, kinds: set[str], out_dir: str,
                    device: str | torch.device = "cpu", metadata: dict[str, str] | None = None,
                    spill_bytes: int | None = None, progress: Any = None) -> PassResult:
    """Compute ``kinds`` for one model into artefact files in ``out_dir`` (one per layer
    and kind, plus the outside tensors'). ``source``: a model folder or a resolved
    :class:`~mergesmith.checkpoint.ModelSource`."""
    from ..checkpoint import index_folder

    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        index = index_folder(folder)
    else:
        index = source.index
        folder = index.folder
    device = torch.device(device)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise MergeError(f"statistics kinds: {', '.join(sorted(unknown)) or '(none)'}; "
                         "use gram and/or fisher")
    fisher = "fisher" in kinds
    gram = "gram" in kinds
    sk = build_skeleton(folder, set(index.tensors))
    loader = WeightLoader(source if not isinstance(source, (str, os.PathLike)) else index,
                          device, torch.float32)
    for m in sk.model.modules():  # rotary frequencies etc.
        for k, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta":
                m._buffers[k] = b.to(device)
    meta = dict(metadata or {})
    files: list[str] = []
    stores = _Stores(spill_limit() if spill_bytes is None else spill_bytes)
    batches = tokens.batches()
    n, length = tokens.input_ids.shape
    hidden_size = None
    rec = sk.recorder
    calls: dict[tuple, list] = {}  # mask signature → per-layer (args, kwargs)
    head_linears: set[str] = set()
    if sk.output_embedding is not None:
        for s in sk.outside_slots:
            if s.module is sk.output_embedding and s.attr == "weight" and s.name in sk.tied:
                head_linears.add(s.name)  # tied to the embeddings: no Gram

    def save(writer: StatisticsWriter, name: str) -> None:
        path = os.path.join(out_dir, name)
        writer.save(path, meta)
        files.append(path)

    return_freed_memory()
    try:
        # 1. the embeddings, and how the model calls its layers
        first = sk.first_slots()
        emb_params = loader.load(first, requires_grad=False)
        store: HiddenStore | None = None
        layer_inputs: list[HiddenStore] = []
        for b in batches:
            ids = tokens.input_ids[b].to(device)
            mask = tokens.attention_mask[b].to(device)
            rec.mode = "capture"
            with torch.no_grad():
                try:
                    sk.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise MergeError(f"{folder}: the model's forward did not call its "
                                     "last layer")
            h = rec.first_input
            assert h is not None
            if store is None:
                hidden_size = h.shape[-1]
                store = stores.new((n, length, hidden_size))
            store[b] = h
            sig = _signature(tokens.attention_mask[b])
            if sig not in calls:
                calls[sig] = [_to(c, device) for c in rec.calls]
            rec.first_input = None
            rec.calls = [None] * rec.n_layers
        assert store is not None and hidden_size is not None
        emb_names = set(emb_params)
        free(first)  # read again for the Fisher of the embeddings, at the very end
        emb_params = {}

        # 2. the decoder layers, first to last
        for li, layer in enumerate(sk.layers):
            slots = sk.layer_slots[li]
            loader.load(slots)
            collector = GramCollector(_linears(layer, slots, set()), device) if gram else None
            if fisher:
                layer_inputs.append(store)
                nxt = stores.new((n, length, hidden_size))
            else:
                nxt = store  # replaced batch by batch
            with torch.no_grad():
                for b in batches:
                    if collector is not None:
                        collector.mask = tokens.attention_mask[b]
                    call = calls[_signature(tokens.attention_mask[b])][li]
                    out = _run_layer(layer, store[b].to(device), call)
                    if collector is not None:
                        collector.flush()
                    nxt[b] = out
            if collector is not None:
                writer = StatisticsWriter()
                collector.write(writer)
                collector.close()
                save(writer, f"layer-{li:05d}.gram.safetensors")
                collector = writer = None  # type: ignore[assignment]
            free(slots)
            return_freed_memory()
            store = nxt
            if progress:
                progress(f"layer {li + 1}/{len(sk.layers)}")
        rec.returns_tuple = False

        # 3. final norm, LM head, loss
        final = sk.final_slots()
        head_params = loader.load(final, requires_grad=fisher)
        head_grad = None
        if fisher and isinstance(sk.output_embedding, nn.Linear):
            for s in final:
                if (s.module is sk.output_embedding and s.attr == "weight"
                        and not (s.name in sk.tied and s.name in emb_names)):
                    head_grad = _HeadGradient(sk.output_embedding, s.name)
        outside_linears = _linears(sk.model, final, head_linears)
        collector = GramCollector(outside_linears, device) if gram and outside_linears else None
        stop = None
        if not fisher and isinstance(sk.output_embedding, nn.Module):
            def _stop(module: nn.Module, args: tuple) -> None:
                raise _StopForward  # no logits (batch × length × vocab) for Grams alone
            stop = sk.output_embedding.register_forward_pre_hook(_stop)
        fisher_sums: dict[str, torch.Tensor] = {}
        grads_down = stores.new((n, length, hidden_size)) if fisher else None
        tied_grads: list[dict[str, torch.Tensor]] = []
        rec.mode = "final"
        n_batches = len(batches)
        for b in batches:
            ids = tokens.input_ids[b].to(device)
            mask = tokens.attention_mask[b].to(device)
            zeros = torch.zeros((ids.shape[0], ids.shape[1], hidden_size), device=device)
            h = store[b].to(device)
            if collector is not None:
                collector.mask = tokens.attention_mask[b]
            if fisher:
                labels = ids.masked_fill(mask == 0, -100)
                h.requires_grad_(True)
                # The batch's loss is the mean over its predicted tokens. The head stage is
                # position-wise (final norm, LM head, loss), so it runs on pieces of one
                # sequence — HEAD_POSITIONS predictions each, plus the next position for
                # the last one's label (its Gram is counted by the next piece) — each loss
                # weighted by its share of the predictions: the gradients add up to the
                # batch's exactly, with a piece's logits in memory, not the batch's.
                total = int((labels[:, 1:] != -100).sum())
                for r in range(ids.shape[0]):
                    for lo in range(0, max(1, length - 1), HEAD_POSITIONS):
                        hi = min(lo + HEAD_POSITIONS + 1, length)
                        rec.final = h[r:r + 1, lo:hi]
                        piece = labels[r:r + 1, lo:hi]
                        count = int((piece[:, 1:] != -100).sum())
                        if collector is not None:
                            gram_mask = tokens.attention_mask[b][r:r + 1, lo:hi].clone()
                            if hi < length:
                                gram_mask[:, -1] = 0  # the next piece's first position
                            collector.mask = gram_mask
                        row = dict(inputs_embeds=zeros[r:r + 1, lo:hi],
                                   attention_mask=mask[r:r + 1, lo:hi], use_cache=False)
                        if count > 0:
                            with torch.enable_grad():
                                loss = sk.model(**row, labels=piece).loss
                                (loss * (count / total)).backward()
                            del loss
                        elif collector is not None:  # nothing to predict: the Gram only
                            with torch.no_grad():
                                sk.model(**row)
                        if collector is not None:
                            collector.flush()
                if h.grad is None:
                    h.grad = torch.zeros_like(h)
                assert grads_down is not None
                grads_down[b] = h.grad
                shared = {}
                for name, p in head_params.items():
                    if head_grad is not None and name == head_grad.name:
                        g = head_grad.take()
                    else:
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                    if name in sk.tied and name in emb_names:
                        shared[name] = g.detach().clone()
                    else:
                        _add_square(fisher_sums, name, g)
                    p.grad = None
                tied_grads.append(shared)
            else:
                rec.final = h
                with torch.no_grad():
                    try:
                        sk.model(inputs_embeds=zeros, attention_mask=mask, use_cache=False)
                    except _StopForward:  # the head's input is all a Gram needs
                        pass
            if collector is not None:
                collector.flush()
            rec.final = None
        if collector is not None:
            writer = StatisticsWriter()
            collector.write(writer)
            collector.close()
            save(writer, "outside.gram.safetensors")
            collector = writer = None  # type: ignore[assignment]
        if stop is not None:
            stop.remove()
        if head_grad is not None:
            head_grad.close()
            head_grad = None
        free(final)  # before writing: the head's weight and its Fisher are the largest tables
        head_params = {}
        store.close()
        return_freed_memory()
        head_written: set[str] = set()
        if fisher_sums:  # the head's own tensors now; tied ones wait for the embeddings
            writer = StatisticsWriter()
            for name, total in fisher_sums.items():
                writer.add_fisher(name, total.div_(n_batches))
            save(writer, "head.fisher.safetensors")
            head_written |= set(fisher_sums)
            fisher_sums, writer = {}, None  # type: ignore[assignment]

        # 4. Fisher: backward through the layers, last to first, then the embeddings
        if fisher:
            assert grads_down is not None
            grads = grads_down
            for li in reversed(range(len(sk.layers))):
                layer = sk.layers[li]
                slots = sk.layer_slots[li]
                params = loader.load(slots, requires_grad=True)
                inputs = layer_inputs[li]
                below = stores.new((n, length, hidden_size))
                sums: dict[str, torch.Tensor] = {}
                for b in batches:
                    call = calls[_signature(tokens.attention_mask[b])][li]
                    size = b.stop - b.start
                    # one sequence at a time (the layer's gradients add up over them): the
                    # activations autograd keeps are one sequence's, not the batch's
                    for r in range(size):
                        one = slice(b.start + r, b.start + r + 1)
                        x = inputs[one].to(device).requires_grad_(True)
                        with torch.enable_grad():
                            out = _run_layer(layer, x, _sequence_call(call, r, size))
                            torch.autograd.backward(out, grads[one].to(device))
                        assert x.grad is not None
                        below[one] = x.grad
                        del x, out
                    for name, p in params.items():
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        _add_square(sums, name, g)
                        p.grad = None
                writer = StatisticsWriter()
                for name, s in sums.items():
                    writer.add_fisher(name, s.div_(n_batches))
                save(writer, f"layer-{li:05d}.fisher.safetensors")
                free(slots)
                writer = None  # type: ignore[assignment]
                return_freed_memory()
                grads.close()
                inputs.close()
                grads = below
                if progress:
                    progress(f"backward {len(sk.layers) - li}/{len(sk.layers)}")
            # the embedding stage: recompute it with gradients
            emb_params = loader.load(first, requires_grad=True)
            for k, b in enumerate(batches):
                ids = tokens.input_ids[b].to(device)
                mask = tokens.attention_mask[b].to(device)
                rec.mode = "capture"
                with torch.enable_grad():
                    try:
                        sk.model(input_ids=ids, attention_mask=mask, use_cache=False)
                    except _StopForward:
                        pass
                    h = rec.first_input
                    assert h is not None
                    if h.requires_grad:
                        torch.autograd.backward(h, grads[b].to(device))
                rec.first_input = None
                rec.calls = [None] * rec.n_layers
                for name, p in emb_params.items():
                    if name in head_written:  # the final norm: used (and done) by the head
                        p.grad = None
                        continue
                    g = p.grad if p.grad is not None else torch.zeros_like(p)
                    if name in tied_grads[k]:
                        g = g + tied_grads[k][name]
                    _add_square(fisher_sums, name, g)
                    p.grad = None
            grads.close()
            writer = StatisticsWriter()
            for name, s in fisher_sums.items():
                writer.add_fisher(name, s.div_(n_batches))
            save(writer, "outside.fisher.safetensors")
            free(first)
    finally:
        loader.close()
        stores.close()
    return PassResult(files, len(sk.layers), tokens.tokens)


def return_freed_memory() -> None:
    """Large buffers (layers, Grams, hidden states) go back to the OS when freed: a fixed
    glibc mmap threshold (128 KiB; glibc's default one grows after each large free, and the
    heap then fragments into a resident set that creeps up layer by layer), and a trim.
    The merge engine sets its own threshold when it starts (``keep_freed_memory``).
    No-op off glibc."""
    from ..memory import _libc_function, release_free_memory

    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    release_free_memory()


def _add_square(sums: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
    """``sums[name] += g²`` in float32, squaring ``g`` in place (callers drop it): no
    tensor-sized temporaries — for an LM head, gradient, square and old and new sum would
    be four vocabulary × hidden tables at once."""
    g = g.detach()
    sq = g.to(torch.float32) if g.dtype != torch.float32 else g
    sq.mul_(sq)  # float32 sums: tables are vocab × hidden
    if name in sums:
        sums[name].add_(sq)
    else:
        sums[name] = sq


def compute_statistics(model: Any, calibration_tokens: CalibrationTokens,
                       kinds: set[str] | frozenset[str] | str = frozenset({"gram"}),
                       device: str = "cpu", cache: bool = True, out: str | None = None,
                       progress: Any = None) -> Statistics:
    """Statistics of one model (a folder or a resolved ModelSource) on calibration tokens,
    from the cache when already computed (see :mod:`.cache`). ``out``: write the artefact
    folder there instead (no cache)."""
    from .cache import StatsCache

    if isinstance(kinds, str):
        kinds = {k.strip() for k in kinds.split(",") if k.strip()}
    kinds = set(kinds)
    c = StatsCache(enabled=cache and out is None)
    key = c.key(model, calibration_tokens, kinds)
    hit = c.get(key)
    if hit is not None:
        hit.cached = True  # type: ignore[attr-defined]
        return hit
    meta = {"model": key["model"], "calibration": key["calibration"],
            "settings": json.dumps(key, sort_keys=True)}
    with c.building(key, out) as folder:
        result = statistics_pass(model, calibration_tokens, kinds, folder, device, meta,
                                 progress=progress)
        manifest = {"key": key, "files": [os.path.basename(f) for f in result.files],
                    "layers": result.layers, "tokens": result.tokens,
                    "kinds": sorted(kinds)}
        with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    stats = c.open(c.final_path(key, out))
    stats.cached = False  # type: ignore[attr-defined]
    return stats


@dataclass
class StatisticsCost:
    """What a statistics pass of one model costs (from config.json and the checkpoint's
    index; no weight is read). ``memory``: the design's budget terms, in bytes."""

    layer_bytes: int  # the largest of a decoder layer / the outside tensors a stage loads, fp32
    hidden_bytes: int  # calibration hidden states, fp32
    gram_bytes: int  # one layer's Grams, float64 (an upper bound: shared inputs counted apart)
    disk_bytes: int  # the artefact
    flops: float  # forward + Gram products (+ backward for Fisher), multiply-adds × 2
    extra_fisher_bytes: int = 0  # every layer's stored input, one sequence's logits ×3

    @property
    def memory(self) -> int:
        return 2 * (self.layer_bytes + self.hidden_bytes + self.gram_bytes) \
            + self.extra_fisher_bytes


def statistics_cost(source: Any, tokens: int, kinds: set[str] | frozenset[str] = frozenset(
        {"gram"}), max_length: int = 512) -> StatisticsCost:
    """The cost of :func:`compute_statistics` for ``source`` (a folder or ModelSource) on
    ``tokens`` calibration tokens, for ``check``-style estimates."""
    from ..checkpoint import index_folder

    index = index_folder(os.fspath(source)) if isinstance(source, (str, os.PathLike)) \
        else source.index
    sk = build_skeleton(index.folder, set(index.tensors))
    numel = {s.name: math.prod(s.shape) for slots in sk.layer_slots for s in slots}
    layer = max((sum(math.prod(s.shape) for s in slots) for slots in sk.layer_slots),
                default=0)
    first = sum(math.prod(s.shape) for s in {s.name: s for s in sk.first_slots()}.values())
    final = sum(math.prod(s.shape) for s in {s.name: s for s in sk.final_slots()}.values())
    hidden = int(getattr(sk.config, "hidden_size", 0) or 0)
    grams_per_layer = []
    total_gram_elems = 0
    for li, layer_mod in enumerate(sk.layers):
        ins = [m.in_features for m in _linears(layer_mod, sk.layer_slots[li], set()).values()]
        grams_per_layer.append(sum(i * i for i in ins))
        total_gram_elems += sum(i * i for i in ins)
    head = _linears(sk.model, sk.final_slots(), sk.tied)
    head_gram = sum(m.in_features ** 2 for m in head.values())
    total_gram_elems += head_gram
    params = sum(numel.values()) + first + final
    flops = 2.0 * tokens * params + 2.0 * tokens * total_gram_elems
    disk = 4 * total_gram_elems if "gram" in kinds else 0
    extra = 0
    if "fisher" in kinds:
        disk += 4 * params
        flops += 4.0 * tokens * params  # a second forward and the backward
        vocab = int(getattr(sk.config, "vocab_size", 0) or 0)
        extra = 4 * len(sk.layers) * tokens * hidden \
            + 3 * 4 * min(max_length, HEAD_POSITIONS + 1) * vocab + 2 * 4 * final
    return StatisticsCost(4 * max(layer, first, final), 4 * tokens * hidden,
                          8 * max(grams_per_layer + [head_gram]), disk, flops, extra)
