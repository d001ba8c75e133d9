"""RegMean++'s layer-sequential pass: each layer's statistics are taken on the hidden
states of the *already merged* earlier layers.

For decoder layer ``l``: the merged hidden states (calibration tokens through the merged
embeddings and merged layers ``< l``) go through every model's own layer ``l``, whose
``nn.Linear`` input Grams are collected (inside the layer, the inputs of later linears —
``o_proj``, ``down_proj`` — come from that model's own earlier sublayers); the layer's
linear weights are merged with :func:`~mergesmith.methods.regmean_math.regmean_solve`
(per-model ``weights`` scale the Grams); its other tensors (norms, biases) by the weighted
average ``Σ λᵢ Tᵢ / Σ λᵢ``, or by task arithmetic ``B + Σ λᵢ (Tᵢ − B)`` when a base model is
given; then the merged layer runs on the merged hidden states to give layer ``l + 1``'s
input. The embeddings are merged first (average / task arithmetic), the final norm and
the LM head last (an untied head by RegMean on the final normed merged hidden states as
each model's norm gives them).

Memory: one layer of every model + the merged layer + the hidden states + one layer's
Grams per model. One model with weight 1 gives it back (float64 solve, rounded to the
checkpoint's dtype).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import MergeError
from .calibration import CalibrationTokens
from .collect import (
    GramCollector,
    HiddenStore,
    Skeleton,
    WeightLoader,
    _linears,
    _run_layer,
    _signature,
    _StopForward,
    _to,
    build_skeleton,
    free,
)

MergeFn = Callable[[list[str], "list[dict[str, tuple[torch.Tensor, int]]] | None"],
                   dict[str, torch.Tensor]]
"""``merge(names, grams)`` of :func:`regmean_plusplus_merge`."""


def _source(model: Any) -> tuple[str, Any]:
    from ..checkpoint import index_folder

    if isinstance(model, (str, os.PathLike)):
        index = index_folder(os.fspath(model))
        return index.folder, index
    return model.index.folder, model


class _Model:
    def __init__(self, model: Any, device: torch.device) -> None:
        self.folder, source = _source(model)
        index = source.index if hasattr(source, "index") else source
        self.index = index
        self.sk: Skeleton = build_skeleton(self.folder, set(index.tensors))
        self.loader = WeightLoader(source, device, torch.float32)
        for m in self.sk.model.modules():
            for k, b in list(m._buffers.items()):
                if b is not None and b.device.type != "meta":
                    m._buffers[k] = b.to(device)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.loader.read(n) for n in dict.fromkeys(names)}


def regmean_plusplus_merge(models: list[Any], weights: list[float] | None,
                           base: Any | None, calibration_tokens: CalibrationTokens,
                           alpha: float = 0.9, device: str | torch.device = "cpu",
                           out_dtype: torch.dtype | None = None,
                           merge: MergeFn | None = None,
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Merge ``models`` (folders or ModelSources of one architecture) with RegMean++;
    yields ``(checkpoint tensor name, merged tensor)`` layer by layer (embeddings first,
    then each decoder layer's tensors, then the final norm and head, then any checkpoint
    tensor that is no parameter). Tensors come in ``out_dtype`` (default: the first
    model's stored dtype of each tensor).

    ``merge(names, grams)`` replaces the merge of a group of tensors (the recipe method's
    engine does this, so that the hidden states carried on are exactly its output):
    ``grams`` holds per model ``{weight name: (Σ x xᵀ float64, tokens)}`` of the group's
    linear layers (None for groups without: embeddings, the rest); it returns every name's
    merged tensor in its output dtype. ``weights``, ``base`` and ``alpha`` are then
    unused."""
    from ..methods.regmean_math import regmean_solve

    if not models:
        raise MergeError("regmean_plusplus needs at least one model")
    weights = list(weights) if weights is not None else [1.0] * len(models)
    if len(weights) != len(models):
        raise MergeError("regmean_plusplus: one weight per model")
    if sum(weights) == 0:
        raise MergeError("regmean_plusplus: the weights sum to 0")
    device = torch.device(device)
    ms = [_Model(m, device) for m in models]
    base_m = _Model(base, device) if base is not None else None
    merged = ms[0]  # its skeleton runs the merged tensors
    sk = merged.sk
    for m in ms[1:] + ([base_m] if base_m else []):
        for name, info in merged.index.tensors.items():
            other = m.index.tensors.get(name)
            if other is None or other.shape != info.shape:
                raise MergeError(f"regmean_plusplus: {m.folder} has no tensor {name} of shape "
                                 f"{list(info.shape)}")
        if len(m.sk.layers) != len(sk.layers):
            raise MergeError(f"regmean_plusplus: {m.folder} has {len(m.sk.layers)} layers, "
                             f"{merged.folder} {len(sk.layers)}")
    total = float(sum(weights))

    def dtype_of(name: str) -> torch.dtype:
        return out_dtype or merged.index.tensors[name].dtype

    def plain(names: list[str]) -> dict[str, torch.Tensor]:
        """Weighted average, or task arithmetic on the base, in float64."""
        out = {}
        for name in dict.fromkeys(names):
            ts = [m.loader.read(name).to(torch.float64) for m in ms]
            if base_m is not None:
                b = base_m.loader.read(name).to(torch.float64)
                value = b + sum(w * (t - b) for w, t in zip(weights, ts))
            elif len(ts) == 1 and weights[0] == 1:
                value = ts[0]
            else:
                value = sum(w * t for w, t in zip(weights, ts)) / total
            out[name] = value
        return out

    def emit(values: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, v in values.items():
            yield name, v.to(dtype_of(name))

    tokens = calibration_tokens
    batches = tokens.batches()
    n, length = tokens.input_ids.shape
    emitted: set[str] = set()
    rec = sk.recorder
    try:
        # embeddings (and whatever else precedes the first layer)
        first = sk.first_slots()
        first_values = (plain([s.name for s in first]) if merge is None
                        else merge([s.name for s in first], None))
        merged.loader.load(first, {k: v.float() for k, v in first_values.items()})
        yield from emit(first_values)
        emitted |= set(first_values)
        store: HiddenStore | None = None
        calls: dict[tuple, list] = {}
        for b in batches:
            rec.mode = "capture"
            with torch.no_grad():
                try:
                    sk.model(input_ids=tokens.input_ids[b].to(device),
                             attention_mask=tokens.attention_mask[b].to(device),
                             use_cache=False)
                except _StopForward:
                    pass
            h = rec.first_input
            assert h is not None
            if store is None:
                store = HiddenStore((n, length, h.shape[-1]), None)
            store[b] = h
            sig = _signature(tokens.attention_mask[b])
            if sig not in calls:
                calls[sig] = [_to(c, device) for c in rec.calls]
            rec.first_input, rec.calls = None, [None] * rec.n_layers
        free(first)
        assert store is not None
        hidden = store.shape[-1]

        # the decoder layers
        for li in range(len(sk.layers)):
            names = [s.name for s in sk.layer_slots[li]]
            grams: list[dict[str, torch.Tensor]] = []
            tensors: list[dict[str, torch.Tensor]] = []
            for m in ms:
                slots = m.sk.layer_slots[li]
                values = m.read([s.name for s in slots])
                m.loader.load(slots, values)
                collector = GramCollector(_linears(m.sk.layers[li], slots, set()), device)
                with torch.no_grad():
                    for b in batches:
                        collector.mask = tokens.attention_mask[b]
                        call = calls[_signature(tokens.attention_mask[b])][li]
                        _run_layer(m.sk.layers[li], store[b].to(device), call)
                        collector.flush()
                collector.close()
                grams.append({name: (g, count) for key, (g, count) in collector.groups.items()
                              for name in key})
                tensors.append(values if merge is None else {})
                free(slots)
            if merge is not None:
                values = merge(names, grams)
            else:
                linear = set(grams[0])
                values = plain([nm for nm in names if nm not in linear])
                for name in dict.fromkeys(nm for nm in names if nm in linear):
                    values[name] = regmean_solve([t[name] for t in tensors],
                                                 [g[name][0] for g in grams], alpha=alpha,
                                                 coefficients=weights)
            del grams, tensors
            slots = sk.layer_slots[li]
            merged.loader.load(slots, {k: (v if merge is not None else v.to(dtype_of(k))).float()
                                       for k, v in values.items()})
            with torch.no_grad():
                for b in batches:
                    call = calls[_signature(tokens.attention_mask[b])][li]
                    store[b] = _run_layer(sk.layers[li], store[b].to(device), call)
            free(slots)
            yield from emit(values)
            emitted |= set(values)

        # final norm and head
        final = sk.final_slots()
        tied_head = {s.name for s in final if s.name in emitted}
        head_grams: list[dict[str, torch.Tensor]] = []
        for m in ms:
            m_final = m.sk.final_slots()
            m.loader.load(m_final)
            linears = _linears(m.sk.model, m_final, tied_head)
            collector = GramCollector(linears, device)
            m.sk.recorder.mode = "final"
            with torch.no_grad():
                for b in batches:
                    collector.mask = tokens.attention_mask[b]
                    ids = tokens.input_ids[b]
                    m.sk.recorder.final = store[b].to(device)
                    m.sk.model(inputs_embeds=torch.zeros((ids.shape[0], ids.shape[1], hidden),
                                                         device=device),
                               attention_mask=tokens.attention_mask[b].to(device),
                               use_cache=False)
                    collector.flush()
            m.sk.recorder.final = None
            collector.close()
            head_grams.append({name: (g, count) for key, (g, count)
                               in collector.groups.items() for name in key})
            free(m_final)
        names = [s.name for s in final if s.name not in emitted]
        if merge is not None:
            values = merge(names, head_grams)
        else:
            linear = set(head_grams[0])
            values = plain([nm for nm in names if nm not in linear])
            for name in dict.fromkeys(nm for nm in names if nm in linear):
                values[name] = regmean_solve([m.loader.read(name) for m in ms],
                                             [g[name][0] for g in head_grams], alpha=alpha,
                                             coefficients=weights)
        yield from emit(values)
        emitted |= set(values)
        store.close()
        rest = [name for name in merged.index.tensors if name not in emitted]
        yield from emit(plain(rest) if merge is None else merge(rest, None))
    finally:
        for m in ms + ([base_m] if base_m else []):
            m.loader.close()


def write_regmean_plusplus(models: list[Any], weights: list[float] | None, base: Any | None,
                           calibration_tokens: CalibrationTokens, out: str, *,
                           alpha: float = 0.9, device: str | torch.device = "cpu",
                           out_dtype: torch.dtype | None = None,
                           shard_bytes: int = 2 << 30) -> list[str]:
    """Run :func:`regmean_plusplus_merge` and write a model folder ``out`` (safetensors
    shards of about ``shard_bytes`` written as layers finish, an index, and the first
    model's config, generation config and tokenizer files), outside the engine (recipes use
    ``merge_method: regmean_plusplus``). Returns the shard file names."""
    import json
    import shutil

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    first, _ = _source(models[0])
    pending: dict[str, torch.Tensor] = {}
    size = 0
    shards: list[dict[str, torch.Tensor] | str] = []

    def flush() -> None:
        nonlocal pending, size
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(pending, os.path.join(out, name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in pending})
            pending, size = {}, 0

    weight_map: dict[str, str] = {}
    for name, tensor in regmean_plusplus_merge(models, weights, base, calibration_tokens,
                                               alpha=alpha, device=device,
                                               out_dtype=out_dtype):
        pending[name] = tensor.contiguous().cpu()
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    names = [s for s in shards if isinstance(s, str)]
    total = sum(os.path.getsize(os.path.join(out, n)) for n in names)
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    from ..evaluate.cache import _CONTENT_FILES

    for side in (*_CONTENT_FILES, "generation_config.json", "chat_template.jinja"):
        path = os.path.join(first, side)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, side))
    return names
