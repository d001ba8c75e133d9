"""The catalogue of bad inputs: one scenario each, with the exit code and the words the
one-line message must contain (the culprit and the fix).

A case's ``build(root)`` creates its files under ``root`` and returns the CLI arguments.
``{out}`` in them is replaced by the output folder the runner checks afterwards.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import LLAMA, random_tensors, write_model

USER, IO = 2, 1


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]
    exit_code: int
    fragments: list[str]
    needs: str | None = None  # "readonly"/"tinyfs": needs a tmpfs mount (else skipped)


def models(root: Path) -> dict[str, Path]:
    """A base and a fine-tune (float32, tiny Llama), built once per case folder."""
    if not (root / "base").exists():
        base = random_tensors(LLAMA, 0)
        write_model(root / "base", base)
        write_model(root / "ft", random_tensors(LLAMA, 1, base))
    return {"base": root / "base", "ft": root / "ft"}


def recipe(root: Path, text: str) -> Path:
    m = models(root)
    path = root / "recipe.yml"
    path.write_text(text.format(base=m["base"], ft=m["ft"], root=root))
    return path


TA = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft}
    parameters:
      weight: 0.5
"""


def run(text: str, *flags: str) -> Callable[[Path], list[str]]:
    return lambda root: ["run", str(recipe(root, text)), "{out}", *flags]


def with_model(mutate: Callable[[Path], None], *flags: str,
               method: str = "linear") -> Callable[[Path], list[str]]:
    """Run a linear merge of the base and a third model that ``mutate`` breaks."""
    def build(root: Path) -> list[str]:
        m = models(root)
        bad = write_model(root / "bad", random_tensors(LLAMA, 2))
        mutate(bad)
        path = root / "recipe.yml"
        path.write_text(f"""merge_method: {method}
models:
  - model: {m['base']}
    parameters: {{weight: 1}}
  - model: {bad}
    parameters: {{weight: 1}}
""")
        return ["run", str(path), "{out}", *flags]
    return build


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def replace_weights(content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "model.safetensors").write_bytes(content)


def truncate_weights(keep: int) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:keep])
    return mutate


def index_pointing_to(shard: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    return mutate


def hostile_bin(folder: Path) -> None:
    """A pickle that would create a marker file when unpickled without weights_only."""
    (folder / "model.safetensors").unlink()
    marker = folder / "PWNED"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": Payload()},
               folder / "pytorch_model.bin")


def weights_replaced_by_folder(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def nan_model(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, str(folder / "model.safetensors"))


def different_width(folder: Path) -> None:
    wide = dict(LLAMA, intermediate_size=40)
    for f in folder.iterdir():
        f.unlink()
    write_model(folder, random_tensors(wide, 3), wide)


def bigger_vocab(folder: Path) -> None:
    config = dict(LLAMA, vocab_size=LLAMA["vocab_size"] + 8)
    for f in folder.iterdir():
        f.unlink()
    write_model(folder, random_tensors(config, 3), config)


def int8_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(folder / "model.safetensors"))
    t["model.norm.weight"] = torch.arange(32, dtype=torch.int8)
    save_file(t, str(folder / "model.safetensors"))


def gguf_input(files: dict[str, bytes]) -> Callable[[Path], list[str]]:
    """A recipe whose one model is the first of these (GGUF) files."""
    def build(root: Path) -> list[str]:
        for name, data in files.items():
            (root / name).write_bytes(data)
        path = root / "recipe.yml"
        path.write_text(f"merge_method: linear\nmodels:\n  - model: {root / next(iter(files))}"
                        "\n    parameters: {weight: 1.0}\n")
        return ["run", str(path), "{out}"]
    return build


def fp8_model(scales: str = "ok", quant_method: str = "fp8") -> Callable[[Path], None]:
    """Turn the model into block-scaled FP8 (16×16 blocks), with its scales missing or of
    the wrong shape, or a quant_method mergesmith does not read."""
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(folder / "model.safetensors"))
        name = "model.layers.0.mlp.up_proj.weight"  # 48 × 32: 3 × 2 blocks
        t[name] = t[name].to(torch.float8_e4m3fn)
        if scales == "ok":
            t[f"{name}_scale_inv"] = torch.ones(3, 2)
        elif scales == "wrong_shape":
            t[f"{name}_scale_inv"] = torch.ones(2, 2)
        save_file(t, str(folder / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": quant_method,
                                         "weight_block_size": [16, 16]}
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def mxfp4_model(defect: str) -> Callable[[Path], None]:
    """Give the model gpt-oss-style MXFP4 experts (blocks [2, 8, 1, 16], scales [2, 8, 1]) with
    one defect: the scales missing, of the wrong shape, or not uint8."""
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        t = load_file(str(folder / "model.safetensors"))
        name = "model.layers.0.mlp.experts.down_proj"
        t[f"{name}_blocks"] = torch.zeros(2, 8, 1, 16, dtype=torch.uint8)
        scales = {"missing": None, "wrong_shape": torch.zeros(2, 8, 2, dtype=torch.uint8),
                  "wrong_dtype": torch.zeros(2, 8)}[defect]
        if scales is not None:
            t[f"{name}_scales"] = scales
        save_file(t, str(folder / "model.safetensors"))
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "mxfp4",
                                         "modules_to_not_convert": ["model.embed_tokens"]}
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


CASES: list[Case] = [
    # --- the recipe file and YAML
    Case("recipe_missing", lambda r: ["run", str(r / "nope.yml"), "{out}"], USER,
         ["recipe file not found", "nope.yml"]),
    Case("recipe_is_folder", lambda r: ["run", str(r), "{out}"], USER, ["is a folder"]),
    Case("yaml_syntax", run("merge_method: linear\nmodels:\n  - model: [a\n"), USER,
         ["YAML syntax error", "recipe.yml:"]),
    Case("yaml_tab_indent", run("merge_method: linear\nmodels:\n\t- model: a\n"), USER,
         ["YAML syntax error", ":3:"]),
    Case("duplicate_key", run(TA + "merge_method: ties\n"), USER,
         ["duplicate key 'merge_method'", "first given on line 1"]),
    Case("empty_recipe", run(""), USER, ["the recipe is empty"]),
    Case("recipe_is_list", run("- merge_method: linear\n"), USER, ["YAML mapping"]),
    # --- keys and types
    Case("unknown_top_key", run(TA + "tokenizer_souce: union\n", "--strict"), USER,
         ["unknown key 'tokenizer_souce'", "Did you mean 'tokenizer_source'", ":7:"]),
    Case("unknown_model_key", run(TA.replace("    parameters:", "    paramters:"), "--strict"),
         USER,
         ["unknown key 'paramters'", "models[0]", "Did you mean 'parameters'"]),
    Case("unknown_slice_key", run("merge_method: passthrough\nslices:\n  - sources:\n"
                                  "      - model: {ft}\n        layer_rang: [0, 2]\n"), USER,
         ["unknown key 'layer_rang'", "Did you mean 'layer_range'"]),
    Case("missing_merge_method", run("models:\n  - model: {ft}\n"), USER,
         ["missing the required key 'merge_method'"]),
    Case("merge_method_not_string", run("merge_method: [linear]\nmodels:\n  - model: {ft}\n"),
         USER, ["merge_method", "valid string"]),
    Case("layer_range_not_ints", run("merge_method: passthrough\nslices:\n  - sources:\n"
                                     "      - model: {ft}\n        layer_range: [0, two]\n"),
         USER, ["layer_range", "integer"]),
    Case("dtype_unknown", run(TA + "dtype: int4\n"), USER, ["unknown dtype 'int4'", "dtype"]),
    Case("seed_not_int", run(TA + "seed: lots\n"), USER, ["seed", "integer"]),
    Case("bad_model_reference", run(TA.replace("model: {ft}", "model: a@b@c")), USER,
         ["more than one '@'", "models[0].model"]),
    # --- methods and parameters
    Case("unknown_method", run(TA.replace("task_arithmetic", "task_arithmatic")), USER,
         ["unknown merge method 'task_arithmatic'", "Did you mean 'task_arithmetic'"]),
    Case("unknown_parameter", run(TA.replace("weight:", "wieght:"), "--strict"), USER,
         ["unknown parameter 'wieght'", "Did you mean 'weight'", "models[0].parameters"]),
    Case("global_param_on_model", run(TA + "      lambda: 2\n", "--strict"), USER,
         ["'lambda' applies to the whole merge", "top-level"]),
    Case("weight_not_number", run(TA.replace("weight: 0.5", "weight: heavy")), USER,
         ["weight", "expects a number", "heavy"]),
    Case("bool_not_bool", run(TA + "parameters:\n  normalize: 0.5\n"), USER,
         ["normalize", "boolean"]),
    Case("int_gradient_fraction", run("merge_method: karcher\nmodels:\n  - model: {base}\n"
                                      "  - model: {ft}\nparameters:\n  max_iter: [10, 15]\n"),
         USER, ["max_iter", "integer"]),
    Case("missing_weight", run(TA.replace("    parameters:\n      weight: 0.5\n", "")), USER,
         ["needs the parameter 'weight'", "{ft}"]),
    Case("missing_t", run("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n"
                          "  - model: {ft}\n"), USER, ["needs the parameter 't'"]),
    Case("filter_unknown_key", run(TA.replace("weight: 0.5", "weight:\n        - filtr: mlp\n"
                                              "          value: 1"), "--strict"), USER,
         ["unknown key 'filtr'", "Did you mean 'filter'"]),
    Case("bad_regex_filter", run(TA.replace("weight: 0.5", "weight:\n        - filter: 're:(('\n"
                                            "          value: 1")), USER,
         ["invalid regular expression"]),
    # --- structure and contracts
    Case("models_and_slices", run(TA + "slices:\n  - sources:\n      - model: {ft}\n"
                                       "        layer_range: [0, 2]\n"), USER,
         ["exactly one of 'models', 'slices' or 'modules'"]),
    Case("no_models", run("merge_method: linear\n"), USER, ["exactly one of 'models'"]),
    Case("tokenizer_and_source", run(TA + "tokenizer: {{source: base}}\ntokenizer_source: union\n"),
         USER, ["'tokenizer_source' and 'tokenizer' cannot be used together"]),
    Case("layer_range_past_end", run("merge_method: passthrough\nslices:\n  - sources:\n"
                                     "      - model: {ft}\n        layer_range: [1, 9]\n"), USER,
         ["layer_range [1, 9] is past the end", "has 3 layers"]),
    Case("layer_range_empty", run("merge_method: passthrough\nslices:\n  - sources:\n"
                                  "      - model: {ft}\n        layer_range: [2, 2]\n"), USER,
         ["layer_range [2, 2] is empty"]),
    Case("slice_lengths_differ", run("merge_method: linear\nslices:\n  - sources:\n"
                                     "      - model: {ft}\n        layer_range: [0, 2]\n"
                                     "      - model: {base}\n        layer_range: [0, 3]\n"),
         USER, ["must span the same number of layers"]),
    Case("no_base_for_ties", run("merge_method: ties\nmodels:\n  - model: {ft}\n"
                                 "    parameters: {{weight: 1}}\n"), USER,
         ["needs a base model", "base_model:"]),
    Case("passthrough_with_base", run("merge_method: passthrough\nbase_model: {base}\nmodels:\n"
                                      "  - model: {ft}\n"), USER, ["remove 'base_model'"]),
    Case("slerp_three_inputs", run("merge_method: slerp\nbase_model: {base}\nmodels:\n"
                                   "  - model: {ft}\n  - model: {root}/ft\n"
                                   "parameters: {{t: 0.5}}\n"), USER,
         ["listed twice"]),
    Case("zero_weight_sum", run("merge_method: linear\nmodels:\n  - model: {base}\n"
                                "    parameters: {{weight: 1}}\n  - model: {ft}\n"
                                "    parameters: {{weight: -1}}\n"), USER,
         ["sum to zero", "normalize: false"]),
    Case("unknown_module", run("merge_method: linear\nmodules:\n  vision_tower:\n    models:\n"
                               "      - model: {ft}\n        parameters: {{weight: 1}}\n"), USER,
         ["no module 'vision_tower'", "Its modules: default"]),
    Case("bad_chat_template", run(TA + "chat_template: chatmk\n"), USER,
         ["neither 'auto', a built-in template"]),
    Case("token_source_bad_kind", run(TA + "tokenizer:\n  source: base\n  tokens:\n    <s>:\n"
                                           "      source: {{kind: random}}\n"), USER,
         ["unknown token source kind 'random'"]),
    # --- model folders and files
    Case("model_folder_missing", run(TA.replace("model: {ft}", "model: {root}/nope")), USER,
         ["model folder not found", "nope"]),
    Case("model_path_is_file", run(TA.replace("model: {ft}", "model: {root}/recipe.yml")), USER,
         ["is a file", "config.json"]),
    Case("folder_without_weights", with_model(lambda f: (f / "model.safetensors").unlink()),
         USER, ["no model weights in", "bad"]),
    Case("weights_unreadable", with_model(weights_replaced_by_folder), USER,
         ["cannot read", "model.safetensors"]),
    Case("index_missing_shard", with_model(index_pointing_to("model-00002-of-00002.safetensors")),
         USER, ["names the shard 'model-00002-of-00002.safetensors'", "missing"]),
    Case("index_escapes_folder", with_model(index_pointing_to("../base/model.safetensors")),
         USER, ["refusing to read outside the model folder"]),
    Case("index_absolute_path", with_model(index_pointing_to("/etc/passwd")), USER,
         ["refusing to read outside the model folder"]),
    Case("truncated_file", with_model(truncate_weights(5)), USER,
         ["truncated or empty", "model.safetensors"]),
    Case("oversized_header", with_model(replace_weights(struct.pack("<Q", 10**13) + b"{}")), USER,
         ["corrupt safetensors header", "declared length"]),
    Case("malformed_header", with_model(replace_weights(struct.pack("<Q", 6) + b"{nope}")), USER,
         ["not valid JSON"]),
    Case("data_past_end", with_model(truncate_weights(-100)), USER,
         ["runs past the end of the file"]),
    Case("unknown_dtype", with_model(replace_weights(safetensors_bytes(
        {"model.norm.weight": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}},
        b"\0" * 4))), USER, ["dtype 'Q4_K'", "cannot read"]),
    Case("hostile_pickle", with_model(hostile_bin), USER,
         ["never runs pickled code", "pytorch_model.bin"]),
    Case("mismatched_shapes", with_model(different_width), USER,
         ["different shapes", "mlp", "[32, 48]", "[32, 40]"]),
    Case("different_vocab", with_model(bigger_vocab), USER,
         ["different vocabulary sizes", "tokenizer: {source: union}",
          "--unsafe-truncate-embeddings"]),
    Case("fp8_without_scales", with_model(fp8_model(scales="missing")), USER,
         ["FP8 tensor 'model.layers.0.mlp.up_proj.weight'", "_scale_inv", "incomplete"]),
    Case("fp8_scale_shape", with_model(fp8_model(scales="wrong_shape")), USER,
         ["blocks of [16, 16] over [48, 32]", "need float32 [3, 2]"]),
    Case("unknown_quant_method", with_model(fp8_model(quant_method="gptq")), USER,
         ["quant_method 'gptq' is not supported", "dequantize other formats first"]),
    Case("mxfp4_without_scales", with_model(mxfp4_model("missing")), USER,
         ["MXFP4 tensor 'model.layers.0.mlp.experts.down_proj_blocks'",
          "down_proj_scales", "incomplete"]),
    Case("mxfp4_scale_shape", with_model(mxfp4_model("wrong_shape")), USER,
         ["has shape [2, 8, 2]", "MXFP4 blocks [2, 8, 1, 16] need scales [2, 8, 1]"]),
    Case("mxfp4_scale_dtype", with_model(mxfp4_model("wrong_dtype")), USER,
         ["'model.layers.0.mlp.experts.down_proj_scales' is float32", "uint8"]),
    Case("gguf_type_for_a_folder", run(TA + "out_dtype: q8_0\n"), USER,
         ["q8_0 is a GGUF type", "ending in .gguf"]),
    Case("fp8_for_a_gguf_file",
         lambda r: ["run", str(recipe(r, TA + "out_dtype: float8_e4m3fn\n")),
                    str(r / "out.gguf")], USER,
         ["a GGUF output is written as f32, f16, bf16, q8_0"]),
    Case("gguf_output_without_tokenizer",
         lambda r: ["run", str(recipe(r, TA)), str(r / "out.gguf")], USER,
         ["GGUF output needs the tokenizer as tokenizer.json"]),
    Case("gguf_not_gguf", gguf_input({"model.gguf": b"PK\x03\x04 a zip"}), USER,
         ["model.gguf is not a GGUF file", "b'PK\\x03\\x04'"]),
    Case("gguf_split_part_missing",
         gguf_input({"m-00001-of-00003.gguf": b"GGUF", "m-00003-of-00003.gguf": b"GGUF"}),
         USER, ["split GGUF of 3 parts is missing m-00002-of-00003.gguf"]),
    Case("integer_weights", with_model(int8_weights), USER,
         ["model.norm.weight", "int8", "cannot be merged"]),
    Case("nan_strict", with_model(nan_model, "--strict-finite"), USER,
         ["model.layers.1.mlp.up_proj.weight", "NaN or Inf", "--strict-finite"]),
    # --- the output
    Case("output_is_file", lambda r: ["run", str(recipe(r, TA)), str(_touch(r / "outfile"))],
         USER, ["is a file"]),
    Case("output_exists", lambda r: ["run", str(recipe(r, TA)), str(_mkdir(r / "outdir"))], USER,
         ["already exists", "--overwrite"]),
    Case("bad_shard_size", run(TA, "--out-shard-size", "lots"), USER,
         ["invalid --out-shard-size 'lots'", "2GB"]),
    Case("mergekit_shard_count", run(TA, "--out-shard-size", "1B"), USER,
         ["mergekit's spelling", "--out-shard-size 1GB", "mergesmith mergekit-yaml"]),
    Case("no_cuda", run(TA, "--device", "cuda"), USER, ["no CUDA GPU"]),
    Case("no_write_permission", lambda r: ["run", str(recipe(r, TA)), str(r / "ro" / "out")],
         USER, ["no permission to write"], needs="readonly"),
    Case("disk_full", lambda r: ["run", str(recipe(r, TA)), str(r / "tiny" / "out")], IO,
         ["not enough disk space", "needs"], needs="tinyfs"),
]


def _touch(path: Path) -> Path:
    path.write_text("x")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path
