#!/usr/bin/env python3
"""Turn a model folder of bench/make_models.py into block-scaled FP8 (DeepSeek-V3 layout).

    python bench/make_fp8.py SRC DST [--block 128]

Linear weights of the layers become ``float8_e4m3fn`` with ``*_scale_inv`` (float32, one
per 128×128 block: amax / 448); embeddings, head and norms keep their dtype. One shard at a
time; config.json gets ``quantization_config``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    gr, gc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(gr * block, gc * block, dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(gr, block, gc, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(gr * block, gc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args()
    args.dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard in sorted(args.src.glob("*.safetensors")):
        out = {}
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if ".layers." in name and t.dim() == 2:
                    out[name], out[f"{name}_scale_inv"] = quantize(t, args.block)
                else:
                    out[name] = t
        save_file(out, str(args.dst / shard.name), metadata={"format": "pt"})
        weight_map.update({name: shard.name for name in out})
        print(f"{shard.name}: {len(out)} tensors", flush=True)
    index = args.src / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        (args.dst / index.name).write_text(json.dumps(data, indent=1))
    config = json.loads((args.src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [args.block, args.block]}
    (args.dst / "config.json").write_text(json.dumps(config, indent=1))
    for extra in ("generation_config.json",):
        if (args.src / extra).exists():
            shutil.copy(args.src / extra, args.dst / extra)


if __name__ == "__main__":
    main()
