"""Reading checkpoints (memory-mapped chunks, shards, casts) and the streaming writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtmerge.merging import Checkpoint
from mtmerge.merging.writer import ShardWriter, parse_size, shard_layouts
from tests.merging.conftest import save_checkpoint


def test_reads_dirs_shards_and_single_files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(6, 5, generator=gen).to(torch.bfloat16), "b": torch.randn(7, generator=gen),
               "c": torch.arange(12, dtype=torch.int32).reshape(3, 4), "d": torch.randn(3, 2).half()}
    for shards in (1, 3):
        ckpt = Checkpoint(save_checkpoint(tmp_path / f"s{shards}", tensors, shards=shards))
        assert ckpt.names() == ["a", "b", "c", "d"]
        for name, t in tensors.items():
            assert torch.equal(ckpt.tensor(name), t)
        assert torch.equal(ckpt.read("a", 7, 19), tensors["a"].reshape(-1)[7:19])
        assert torch.equal(ckpt.rows("a", 2, 5), tensors["a"][2:5])
        assert torch.equal(ckpt.read("a", 3, 30, dtype=torch.float32), tensors["a"].reshape(-1)[3:30].float())
        assert torch.equal(ckpt.read("d", dtype=torch.bfloat16), tensors["d"].reshape(-1).to(torch.bfloat16))
        assert bytes(ckpt.raw("c", 4, 12)) == tensors["c"].reshape(-1)[1:3].numpy().tobytes()
        assert sorted(p.name for p in ckpt.aux_files()) == ["config.json", "generation_config.json",
                                                            "tokenizer.json", "tokenizer_config.json"]
        ckpt.close()
    single = tmp_path / "one.safetensors"
    save_file(tensors, str(single))
    assert torch.equal(Checkpoint(single).tensor("b"), tensors["b"])


def test_refuses_pickles_and_never_downloads(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"pickle checkpoint.*can execute arbitrary code"):
        Checkpoint(d, "models[0]")
    for suffix in (".pt", ".pth", ".ckpt", ".bin"):
        f = tmp_path / f"weights{suffix}"
        f.write_bytes(b"\x80\x04")
        with pytest.raises(ValueError, match=r"models\[0\].*pickle"):
            Checkpoint(f, "models[0]")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        Checkpoint("meta-llama/Llama-3-8B", "base_model")


def test_bad_files_are_clear_errors(tmp_path):
    t = {"a": torch.randn(100), "b": torch.randn(100)}
    d = save_checkpoint(tmp_path / "m", t)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-50])
    with pytest.raises(ValueError, match="is truncated"):
        Checkpoint(d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        Checkpoint(d)
    two = tmp_path / "two"
    two.mkdir()
    save_file(t, str(two / "x.safetensors"))
    save_file(t, str(two / "y.safetensors"))
    with pytest.raises(ValueError, match=r"several \.safetensors files but no model\.safetensors\.index\.json"):
        Checkpoint(two)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.safetensors file"):
        Checkpoint(empty)
    sharded = save_checkpoint(tmp_path / "sh", t, shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"]["a"] = "model-00009-of-00009.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"listed in model\.safetensors\.index\.json does not exist"):
        Checkpoint(sharded)


def test_streaming_writer_out_of_order_chunks(tmp_path):
    tensors = {"a": torch.randn(10, 3), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(4).half()}
    entries = [(n, {"torch.float32": "F32", "torch.int64": "I64", "torch.float16": "F16"}[str(t.dtype)],
                tuple(t.shape), t.numel() * t.element_size()) for n, t in sorted(tensors.items())]
    layouts = shard_layouts(entries, 60)
    assert [sorted(x.offsets) for x in layouts] == [["a"], ["b", "c"]]
    assert [x.filename for x in layouts] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert all(len(x.header) % 8 == 0 for x in layouts)
    writer = ShardWriter(tmp_path, layouts)
    writer.create()
    raw = {n: t.reshape(-1).view(torch.uint8).numpy() for n, t in tensors.items()}
    writer.write("c", raw["c"])
    writer.write("a", raw["a"][60:], 60)  # second chunk first
    writer.write("b", raw["b"])
    writer.write("a", raw["a"][:60], 0)
    with pytest.raises(ValueError, match="overflows"):
        writer.write("c", raw["a"])
    writer.close()
    writer.write_index()
    loaded = {}
    for layout in layouts:
        with safe_open(str(tmp_path / layout.filename), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            loaded.update({k: f.get_tensor(k) for k in f.keys()})
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(e[3] for e in entries)
    assert index["weight_map"] == {"a": layouts[0].filename, "b": layouts[1].filename, "c": layouts[1].filename}


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size like"):
        parse_size("5 parsecs")
    with pytest.raises(ValueError, match="positive"):
        parse_size(0)
