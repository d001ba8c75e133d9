"""The engine's seams: an executor decides only who runs the work items and in what
order, never the bytes; the reader sends each tensor to the source of its format."""

from __future__ import annotations

from conftest import LLAMA, random_tensors, recipe_file, write_model

import mergesmith
from mergesmith.checkpoint import TensorReader, index_folder
from mergesmith.execute import execute


class ReversedSerialExecutor:
    """Runs the items one by one, last first (an order no real executor uses)."""

    def __init__(self) -> None:
        self.ran = 0

    def run(self, compute, items, done):
        results = [(item, compute(item)) for item in reversed(items)]
        self.ran = len(results)
        for item, crc in reversed(results):
            done(item, crc)


def test_an_executor_does_not_change_the_bytes(tmp_path):
    base = random_tensors(LLAMA, 0)
    paths = [write_model(tmp_path / n, t, shards=2) for n, t in
             (("base", base), ("a", random_tensors(LLAMA, 1, base)),
              ("b", random_tensors(LLAMA, 2, base)))]
    recipe = recipe_file(tmp_path, f"""merge_method: dare_ties
base_model: {paths[0]}
models:
  - {{model: {paths[1]}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {paths[2]}, parameters: {{weight: 0.4, density: 0.7}}}}
""")
    mergesmith.run(recipe, tmp_path / "threads", out_shard_size="100KB", threads=2)
    plan = mergesmith.plan(recipe, out_shard_size="100KB")
    folder = tmp_path / "reversed"
    folder.mkdir()
    executor = ReversedSerialExecutor()
    digests = {}
    execute(plan, str(folder), executor=executor, digests=digests)
    assert executor.ran == len(plan.tensors) and len(plan.shards) > 1
    for shard in plan.shards:
        assert (folder / shard.filename).read_bytes() == \
            (tmp_path / "threads" / shard.filename).read_bytes()
    assert set(digests) == {s.filename for s in plan.shards}


def test_reader_dispatches_by_format(tmp_path):
    tensors = random_tensors(LLAMA, 0)
    st = index_folder(str(write_model(tmp_path / "st", tensors)))
    pt = index_folder(str(write_model(tmp_path / "pt", tensors, fmt="bin")))
    name = "model.layers.0.mlp.up_proj.weight"
    assert st.tensors[name].format == "safetensors" and pt.tensors[name].format == "bin"
    with TensorReader() as reader:
        for index in (st, pt):
            assert (reader.read(index.tensors[name], (2, 5)) == tensors[name][2:5]).all()
