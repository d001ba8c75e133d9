"""An MoE model from dense models: output architecture, config.json and every output tensor,
planned from metadata only (config.json, safetensors headers) before any weight is read.

The output layout is what transformers itself saves for the output class: a model of that
class is instantiated on the meta device from the output config and its state dict (names,
shapes) is the list of tensors to write. Fused expert tensors (``mlp.experts.gate_up_proj``
[E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) are stacked one expert at a time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..checkpoint import CheckpointIndex, ModelSource, TensorInfo, resolve
from ..checkpoint.safetensors_format import build_header
from ..errors import MergeError
from ..methods import get_method
from ..methods.moe_parts import MOE_PART
from ..options import Options
from ..plan.layout import check_unique, layout, processing_order
from ..plan.types import InputTensor, OutputTensor, Plan
from ..recipe import Recipe
from ..recipe.refs import parse_model_reference
from .config import Expert, MoEConfig

ARCHITECTURES = ("mixtral", "deepseek", "qwen", "qwen3")
"""Output architectures in mergekit-moe's order (Mixtral preferred when it fits, else the
first that fits; ``architecture:`` keeps those whose name starts with it)."""

CLASSES = {"mixtral": "MixtralForCausalLM", "deepseek": "Glm4MoeForCausalLM",
           "qwen": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}
CONFIGS = {"mixtral": "MixtralConfig", "deepseek": "Glm4MoeConfig",
           "qwen": "Qwen2MoeConfig", "qwen3": "Qwen3MoeConfig"}
COMPUTED_FILE = "computed.safetensors"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Computed:
    """A small tensor made before the merge (router, zero bias), stored in a side file."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "router", "shared_router", "zeros"
    layer: int = 0


@dataclass
class MoEDesign:
    """What the MoE output is: everything decided from metadata."""

    config: MoEConfig
    architecture: str
    base: ModelSource
    experts: list[ModelSource]
    shared: list[ModelSource]
    out_config: dict[str, Any]
    out_dtype: torch.dtype
    layers: int
    hidden: int
    computed: list[Computed]
    layout: list[tuple[str, tuple[int, ...]]]  # the output class's tensors


def resolve_sources(c: MoEConfig) -> tuple[ModelSource, list[ModelSource], list[ModelSource]]:
    cache: dict[str, ModelSource] = {}

    def get(ref: Any, where: str) -> ModelSource:
        key = str(ref)
        if key not in cache:
            cache[key] = resolve(ref, where)
        return cache[key]

    base = get(c.base_model, c.at("base_model"))
    return (base, [get(e.model, e.where) for e in c.experts],
            [get(e.model, e.where) for e in c.shared_experts])


def _cfg(m: ModelSource, where: str) -> dict[str, Any]:
    if not m.config:
        raise MergeError(f"{where}: {m.ref} has no config.json")
    return m.config


def _unsupported(arch: str, c: MoEConfig, types: set[str]) -> str | None:
    """Why ``arch`` cannot hold these inputs (None: it can)."""
    n_shared = len(c.shared_experts)
    if len(types) != 1:
        return "all input models must have the same architecture"
    (t,) = types
    if arch == "mixtral":
        if n_shared:
            return "no shared experts"
        if t not in ("llama", "mistral"):
            return "Llama or Mistral inputs only"
    elif arch == "deepseek":
        if not n_shared:
            return "at least one shared expert here (without any, use mixtral)"
        if any(e.positive_prompts or e.negative_prompts for e in c.shared_experts):
            return "shared experts are not gated (no prompts on them)"
        if t not in ("llama", "mistral"):
            return "Llama or Mistral inputs only"
    elif arch == "qwen":
        if n_shared != 1:
            return "exactly one shared expert"
        if c.gate_mode != "random" and not c.shared_experts[0].positive_prompts:
            return "the shared expert needs positive_prompts (its gate) unless gate_mode is random"
        if t not in ("llama", "mistral", "qwen2"):
            return "Qwen2, Llama or Mistral inputs only"
    elif arch == "qwen3":
        if n_shared:
            return "no shared experts"
        if t != "qwen3":
            return "Qwen3 inputs only"
    return None


def choose_architecture(c: MoEConfig, types: set[str]) -> str:
    """mergekit-moe's choice: Mixtral when it fits, else the first that fits."""
    wanted = [a for a in ARCHITECTURES
              if c.architecture is None or a.startswith(c.architecture.strip().lower())]
    if not wanted:
        raise MergeError(f"{c.at('architecture')}: unknown output architecture "
                         f"'{c.architecture}'; choose one of {', '.join(ARCHITECTURES)}")
    why = {a: _unsupported(a, c, types) for a in wanted}
    fits = [a for a in wanted if why[a] is None]
    if not fits:
        reasons = "; ".join(f"{a} needs {why[a]}" for a in wanted)
        possible = [a for a in ARCHITECTURES if _unsupported(a, c, types) is None]
        hint = (f" Possible outputs for these inputs: {', '.join(possible)}." if possible
                else "")
        raise MergeError(f"{c.source}: no MoE output architecture fits these inputs "
                         f"({', '.join(sorted(types))} models, {len(c.shared_experts)} shared "
                         f"expert(s)): {reasons}.{hint}")
    return "mixtral" if "mixtral" in fits else fits[0]


def output_config(arch: str, base: dict[str, Any], c: MoEConfig,
                  dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the output class, from the base's (attention, norms, rope, vocab)."""
    import transformers

    d = {k: v for k, v in base.items() if k not in (
        "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype",
        "dtype", "_name_or_path")}
    inter, n = base["intermediate_size"], len(c.experts)
    k = c.experts_per_token
    if arch == "mixtral":
        d.update(num_local_experts=n, num_experts_per_tok=k, sliding_window=None)
    elif arch == "qwen":
        d.update(num_experts=n, num_experts_per_tok=k, decoder_sparse_step=1,
                 norm_topk_prob=True, sliding_window=None, use_sliding_window=False,
                 moe_intermediate_size=inter, shared_expert_intermediate_size=inter,
                 mlp_only_layers=[])
    elif arch == "qwen3":
        d.update(num_experts=n, num_experts_per_tok=k, decoder_sparse_step=1,
                 norm_topk_prob=True, moe_intermediate_size=inter, mlp_only_layers=[])
    else:  # DeepSeek-V3's MoE block (ungated shared experts) with Llama attention
        d.update(n_routed_experts=n, n_shared_experts=len(c.shared_experts),
                 num_experts_per_tok=k, moe_intermediate_size=inter, first_k_dense_replace=0,
                 n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=True,
                 partial_rotary_factor=1.0, use_qk_norm=False,
                 head_dim=base.get("head_dim") or base["hidden_size"]
                 // base["num_attention_heads"])
        rope = dict(d.get("rope_parameters") or {})
        if rope:
            rope["partial_rotary_factor"] = 1.0
            d["rope_parameters"] = rope
    cfg = getattr(transformers, CONFIGS[arch])(**d)
    cfg.architectures = [CLASSES[arch]]
    cfg.dtype = dtype
    out = cfg.to_dict()
    out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def meta_layout(out_config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes ``save_pretrained`` of the output class writes (tied weights
    left out), from a model instantiated on the meta device."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**{**out_config, "dtype": None})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    tied = set()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)
                if p is out_emb.weight} - {n for n, p in model.named_parameters()}
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n not in tied]


def design(c: MoEConfig) -> MoEDesign:
    """Resolve the inputs (headers only), validate everything, choose the output."""
    base, experts, shared = resolve_sources(c)
    bc = _cfg(base, c.at("base_model"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if not isinstance(bc.get(key), int):
            raise MergeError(f"{c.at('base_model')}: {base.ref} config.json has no {key}; "
                             "only decoder models with a dense MLP can be MoE experts")
    types = {bc.get("model_type")}
    for e, m in [*zip(c.experts, experts), *zip(c.shared_experts, shared)]:
        ec = _cfg(m, e.where)
        if ec.get("model_type") != bc.get("model_type"):
            raise MergeError(f"{e.where}: {m.ref} is a {ec.get('model_type')} model and the "
                             f"base is {bc.get('model_type')}: experts must have the base "
                             "model's architecture")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
            if ec.get(key) != bc.get(key):
                raise MergeError(f"{e.where}: {m.ref} has {key} {ec.get(key)}, the base "
                                 f"model {bc.get(key)}: every expert must have the base's "
                                 "shape")
        types.add(ec.get("model_type"))
    arch = choose_architecture(c, {str(t) for t in types})
    dtype = c.dtype or _base_dtype(base)
    out_config = output_config(arch, bc, c, dtype)
    d = MoEDesign(c, arch, base, experts, shared, out_config, dtype,
                  bc["num_hidden_layers"], bc["hidden_size"], [], meta_layout(out_config))
    return d


def _base_dtype(base: ModelSource) -> torch.dtype:
    from ..units import parse_dtype

    name = (base.config or {}).get("dtype") or (base.config or {}).get("torch_dtype")
    if name:
        return parse_dtype(str(name), f"{base.ref} config.json dtype")
    infos = [t for t in base.index.tensors.values() if t.dtype.is_floating_point]
    return infos[0].dtype if infos else torch.float32


def _mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def plan_moe(d: MoEDesign, options: Options, computed_folder: str) -> Plan:
    """Every output tensor with its inputs; small computed tensors placed in
    ``computed_folder/computed.safetensors`` (written by the caller before executing)."""
    c = d.config
    models: list[ModelSource] = []
    ids: dict[int, int] = {}

    def mid(m: ModelSource) -> int:
        if id(m) not in ids:
            ids[id(m)] = len(models)
            models.append(m)
        return ids[id(m)]

    base_id = mid(d.base)
    exp_ids = [mid(m) for m in d.experts]
    shared_ids = [mid(m) for m in d.shared]
    computed: list[Computed] = []
    outputs: list[OutputTensor] = []
    used_base: set[str] = set()

    def need(model: int, name: str, shape: tuple[int, ...] | None, where: str) -> InputTensor:
        info = models[model].index.tensors.get(name)
        if info is None:
            raise MergeError(f"{where}: {models[model].ref} has no tensor '{name}'")
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise MergeError(f"{where}: tensor '{name}' of {models[model].ref} has shape "
                             f"{list(info.shape)}, the output needs {list(shape)}")
        return InputTensor(model, name)

    def expert_params(e: Expert, residual: bool) -> dict[str, Any]:
        p: dict[str, Any] = {}
        if e.noise_scale:
            p["noise_scale"] = e.noise_scale
        if residual and e.residual_scale is not None:
            p["residual_scale"] = e.residual_scale
        return p

    def tensor(name: str, shape: tuple[int, ...], method: str, inputs: list[InputTensor],
               model_params: list[dict[str, Any]], params: dict[str, Any] | None = None,
               stack: int = 0) -> None:
        outputs.append(OutputTensor(
            name=name, shape=shape, dtype=d.out_dtype, method=method, inputs=tuple(inputs),
            base_index=None, params=params or {}, model_params=tuple(model_params),
            elementwise=method == "passthrough", stack=stack))

    for name, shape in d.layout:
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else -1
        rest = name[m.end():] if m else name
        if rest == "mlp.experts.gate_up_proj":
            half = (shape[1] // 2, shape[2])
            inputs, mps = [], []
            for e, k in zip(c.experts, exp_ids):
                for proj in ("gate_proj", "up_proj"):
                    inputs.append(need(k, _mlp_name(layer, proj), half, e.where))
                    mps.append(expert_params(e, False))
            tensor(name, shape, MOE_PART, inputs, mps, stack=2)
        elif rest == "mlp.experts.down_proj":
            inputs = [need(k, _mlp_name(layer, "down_proj"), shape[1:], e.where)
                      for e, k in zip(c.experts, exp_ids)]
            tensor(name, shape, MOE_PART, inputs,
                   [expert_params(e, True) for e in c.experts], stack=1)
        elif rest.startswith(("mlp.shared_expert.", "mlp.shared_experts.")):
            proj = rest.split(".")[2]
            axis = 1 if proj == "down_proj" else 0
            per = list(shape)
            per[axis] //= len(c.shared_experts)
            inputs = [need(k, _mlp_name(layer, proj), tuple(per), e.where)
                      for e, k in zip(c.shared_experts, shared_ids)]
            tensor(name, shape, MOE_PART, inputs,
                   [expert_params(e, proj == "down_proj") for e in c.shared_experts],
                   {"axis": axis})
        elif rest in ("mlp.gate.weight", "mlp.shared_expert_gate.weight",
                      "mlp.gate.e_score_correction_bias"):
            kind = {"mlp.gate.weight": "router",
                    "mlp.shared_expert_gate.weight": "shared_router"}.get(rest, "zeros")
            computed.append(Computed(name, shape, kind, layer))
        elif name in d.base.index.tensors:
            used_base.add(name)
            tensor(name, shape, "passthrough",
                   [need(base_id, name, shape, c.at("base_model"))], [{}])
        elif d.architecture == "qwen" and name.endswith("_proj.bias"):
            computed.append(Computed(name, shape, "zeros", layer))  # Qwen2-MoE has q/k/v biases
        else:
            raise MergeError(f"{c.at('base_model')}: {d.base.ref} has no tensor '{name}', "
                             f"which the {CLASSES[d.architecture]} output needs")
    left = sorted(n for n in d.base.index.tensors
                  if n not in used_base and ".mlp." not in n and "rotary_emb" not in n)
    if left:
        raise MergeError(f"{c.at('base_model')}: tensor '{left[0]}' of {d.base.ref} (and "
                         f"{len(left) - 1} more) has no place in the {CLASSES[d.architecture]} "
                         "output; these inputs do not fit this output architecture")
    if computed:
        comp = computed_source(computed_folder, computed)
        k = mid(comp)
        for t in computed:
            tensor(t.name, t.shape, "passthrough", [InputTensor(k, t.name)], [{}])
    d.computed = computed
    ordered = processing_order(outputs, models, base_id)
    check_unique(ordered)
    tensors, shards = layout(ordered, options.out_shard_size)
    recipe = Recipe(merge_method="moe", base_model=c.base_model, models=None, slices=None,
                    parameters={}, dtype=None, out_dtype=d.out_dtype, text=c.text,
                    source=c.source, positions=c.positions)
    return Plan(recipe=recipe, method=get_method("passthrough"), models=models,
                donor=base_id, tensors=tuple(tensors), shards=tuple(shards),
                config=d.out_config, options=options, read_dtype=None)


def computed_layout(computed: list[Computed]) -> tuple[bytes, list[int]]:
    return build_header([(t.name, torch.float32, t.shape) for t in computed],
                        {"format": "pt"})


def computed_source(folder: str, computed: list[Computed]) -> ModelSource:
    """The index of the computed tensors' file, known before it is written."""
    import os

    header, offsets = computed_layout(computed)
    path = os.path.join(folder, COMPUTED_FILE)
    tensors = {}
    for t, off in zip(computed, offsets):
        n = 4
        for s in t.shape:
            n *= s
        tensors[t.name] = TensorInfo(t.name, path, torch.float32, t.shape,
                                     len(header) + off, n)
    index = CheckpointIndex(folder, tensors, [path], None, "safetensors")
    return ModelSource(ref=parse_model_reference(folder, "computed tensors"), index=index)
