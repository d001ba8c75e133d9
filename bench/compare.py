#!/usr/bin/env python3
"""Compare the tensors of two model folders (e.g. mergesmith vs mergekit output).

    compare.py DIR_A DIR_B [--base DIR]

Prints, over all tensors, the largest absolute difference, the fraction of
elements that differ, and (with ``--base``) the difference relative to the
size of A's change from the base, so bf16 rounding noise is easy to tell from
a real disagreement. Exit status 1 when the tensor names or shapes differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors import safe_open


def tensors(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, over every *.safetensors file in ``folder``."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: path for k in f.keys()})
    return out


def load(path: Path, name: str):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--base", type=Path, help="base model, to report differences relative to A - base")
    args = ap.parse_args(argv)
    ta, tb = tensors(args.a), tensors(args.b)
    if ta.keys() != tb.keys():
        print(f"tensor names differ: only in A {sorted(ta.keys() - tb.keys())[:5]}, "
              f"only in B {sorted(tb.keys() - ta.keys())[:5]}")
        return 1
    tbase = tensors(args.base) if args.base else {}
    max_abs = diff_count = total = 0
    worst = ""
    delta_sq = diff_sq = 0.0
    for name in sorted(ta):
        x, y = load(ta[name], name), load(tb[name], name)
        if x.shape != y.shape:
            print(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            return 1
        d = (x - y).abs()
        if d.max().item() > max_abs:
            max_abs, worst = d.max().item(), name
        diff_count += int((d > 0).sum())
        total += d.numel()
        diff_sq += float((d * d).sum())
        if name in tbase:
            delta_sq += float(((x - load(tbase[name], name)) ** 2).sum())
    print(f"{len(ta)} tensors, {total} elements: max |A-B| = {max_abs:.3g} ({worst}), "
          f"{diff_count / total:.2%} of elements differ")
    if args.base:
        print(f"||A-B|| / ||A-base|| = {(diff_sq / delta_sq) ** 0.5 if delta_sq else float('nan'):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
