"""`check --nodes N`: the wall time of a merge spread over N nodes, output shards as tasks
(mergesmith.cluster_estimate), and the headers-only checkpoints of bench/virtual_models.py
that such plans are made on."""

from __future__ import annotations

import importlib.util
import sys
from math import ceil, prod
from pathlib import Path

import pytest
from conftest import recipe_file, run_cli

import mergesmith
from mergesmith.api import STARTUP_SECONDS, estimate_seconds, shard_costs
from mergesmith.checkpoint import index_folder
from mergesmith.cluster_estimate import ShardCost, cluster_seconds, node_counts

BENCH = Path(__file__).resolve().parents[1] / "bench" / "virtual_models.py"

SHARDS = [ShardCost(f"s{k}", read, write, compute) for k, (read, write, compute) in
          enumerate([(4e9, 1e9, 30.0), (2e9, 1e9, 10.0), (3e9, 2e9, 12.0), (1e9, 1e9, 5.0),
                     (6e9, 2e9, 40.0), (5e8, 5e8, 1.0), (2e9, 1e9, 8.0)])]


def test_one_node_is_the_compute_plus_the_io_plus_the_tasks():
    e = cluster_seconds(SHARDS, 1, bandwidth=1e9, overhead=2.0, startup=3.0)
    compute = sum(s.compute_seconds for s in SHARDS)
    io = sum(s.read_bytes + s.write_bytes for s in SHARDS) / 1e9
    assert e.seconds == pytest.approx(3.0 + compute + io + 2.0 * len(SHARDS))
    assert (e.tasks, e.used_nodes) == (len(SHARDS), 1)
    assert e.read_bytes == sum(s.read_bytes for s in SHARDS)
    assert e.io_seconds == pytest.approx(io)


def test_monotone_in_nodes_and_bounded_by_the_largest_shard():
    largest = max(s.seconds(1e9, 2.0) for s in SHARDS)
    times = [cluster_seconds(SHARDS, n, bandwidth=1e9, overhead=2.0).seconds
             for n in range(1, 12)]
    assert all(b <= a for a, b in zip(times, times[1:]))
    assert all(t >= largest - 1e-9 for t in times)
    assert times[-1] == pytest.approx(largest)  # more nodes than shards: one shard each
    assert times[1] < times[0]
    total = sum(s.seconds(1e9, 2.0) for s in SHARDS)
    assert all(t >= total / n - 1e-9 for n, t in enumerate(times, 1))  # no free lunch


def test_bandwidth_and_edge_cases():
    slow = cluster_seconds(SHARDS, 2, bandwidth=1e8).seconds
    assert slow > cluster_seconds(SHARDS, 2, bandwidth=1e9).seconds
    assert cluster_seconds([], 4, startup=2.0).seconds == 2.0
    with pytest.raises(ValueError):
        cluster_seconds(SHARDS, 0)
    assert node_counts(8) == [1, 2, 4, 8]
    assert node_counts(6) == [1, 2, 4, 6]
    assert node_counts(1) == [1]


def test_shard_costs_split_the_single_machine_estimate(tmp_path, models):
    r = recipe_file(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
models:
  - {{model: {models['ft_a']}, parameters: {{weight: 0.5, density: 0.5}}}}
  - {{model: {models['ft_b']}, parameters: {{weight: 0.5, density: 0.5}}}}
""")
    p = mergesmith.plan(r, out_shard_size="20K")
    assert len(p.shards) > 2
    costs = shard_costs(p, 2)
    assert sum(c.read_bytes for c in costs) == p.bytes_read
    assert sum(c.write_bytes for c in costs) == p.bytes_written
    compute = sum(c.compute_seconds for c in costs)
    assert compute == pytest.approx(estimate_seconds(p, 2) - STARTUP_SECONDS)
    one = cluster_seconds(costs, 1, bandwidth=1e9, overhead=0.0, startup=STARTUP_SECONDS)
    assert one.seconds == pytest.approx(
        estimate_seconds(p, 2) + (p.bytes_read + p.bytes_written) / 1e9)
    many = cluster_seconds(costs, len(costs), bandwidth=1e9, overhead=0.0)
    assert many.seconds == pytest.approx(max(c.seconds(1e9, 0.0) for c in costs))


def test_check_prints_the_table(tmp_path, models):
    r = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - {{model: {models['ft_a']}, parameters: {{weight: 0.5}}}}
""")
    res = run_cli("check", str(r), "--nodes", "3", "--out-shard-size", "20K",
                  "--node-bandwidth", "100M")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()
            if line.strip()[:1].isdigit() and " s " in line]
    assert [row[0] for row in rows] == ["1", "2", "3"]
    assert "100.00 MB/s" in res.stdout
    seconds = [float(row[1]) for row in rows]
    assert seconds == sorted(seconds, reverse=True)
    plain = run_cli("check", str(r))
    assert "on N nodes" not in plain.stdout
    bad = run_cli("check", str(r), "--nodes", "2", "--node-bandwidth", "0")
    assert bad.returncode != 0 and "--node-bandwidth" in bad.stderr
    assert "recipe:" not in bad.stdout  # refused before planning


def _virtual_models():
    spec = importlib.util.spec_from_file_location("virtual_models", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["virtual_models"] = module
    spec.loader.exec_module(module)
    return module


def test_virtual_models_are_sparse_headers_that_mergesmith_indexes(tmp_path):
    vm = _virtual_models()
    vm.main([str(tmp_path), "--shape", "tiny-test", "--variants", "1"])
    root = tmp_path / "tiny-test"
    base = index_folder(str(root / "base"))
    c = vm.TINY_TEST
    h, moe = c["hidden_size"], c["moe_intermediate_size"]
    t = base.tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
    assert t.shape == (h, moe) and t.quant is not None  # FP8 with its block scales
    assert t.quant.scale.shape == (ceil(h / 128), ceil(moe / 128))
    assert base.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].shape == (4,)
    assert base.tensors["model.layers.0.mlp.gate_proj.weight"].shape == \
        (c["intermediate_size"], h)
    heads, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    assert base.tensors["model.layers.0.self_attn.q_b_proj.weight"].shape == \
        (heads * qk, c["q_lora_rank"])
    assert base.tensors["lm_head.weight"].shape == (c["vocab_size"], h)
    assert len(base.files) == 2
    stored = sum(prod(s) * vm.BYTES[d] for _, d, s in vm.tensors("tiny-test"))
    files = list((root / "base").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) > stored
    for f in files:  # a hole: the data takes no blocks
        assert f.stat().st_blocks * 512 < f.stat().st_size / 2
    ft1 = index_folder(str(root / "ft1"))
    assert {n: i.shape for n, i in ft1.tensors.items()} == \
        {n: i.shape for n, i in base.tensors.items()}
    r = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {root / 'base'}
models:
  - {{model: {root / 'ft1'}, parameters: {{weight: 0.5}}}}
out_dtype: float8_e4m3fn
""")
    p = mergesmith.plan(r)
    assert len(p.tensors) == len(base.tensors)


def test_published_shapes_have_their_parameter_counts():
    vm = _virtual_models()
    params = {shape: sum(prod(s) for n, _, s in vm.tensors(shape)
                         if not n.endswith("_scale_inv"))
              for shape in ("llama-3.1-405b", "deepseek-v3")}
    assert params["llama-3.1-405b"] == pytest.approx(405.9e9, rel=0.01)
    assert params["deepseek-v3"] == pytest.approx(671e9, rel=0.01)
