"""Writing checkpoints: sharding by bytes, determinism, atomic commit, cleanup, sizes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modelgrow.checkpoint import CheckpointWriter, format_size, open_checkpoint, parse_size
from modelgrow.checkpoint import writer as writer_module
from modelgrow.errors import EXIT_OUTPUT, OutputError, UsageError

CONFIG = {"n_layer": 2, "model_type": "gpt2"}


def five_tensors():
    # 100 float32 = 400 bytes each, distinct values so mix-ups show.
    return {f"t{i}": torch.full((10, 10), float(i)) for i in range(5)}


def write(dest, tensors, **kwargs):
    with CheckpointWriter(dest, **kwargs) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.write_json("config.json", CONFIG)
        return writer.commit()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if "modelgrow-" in p.name)


def test_single_shard_round_trip(tmp_path):
    dest = tmp_path / "out"
    tensors = {"b": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "a": torch.ones(3)}
    files = write(dest, tensors, metadata={"grown_by": "modelgrow"})
    assert [f.path for f in files] == ["config.json", "model.safetensors"]
    for f in files:
        data = (dest / f.path).read_bytes()
        assert f.bytes == len(data) and f.sha256 == hashlib.sha256(data).hexdigest()
    with open_checkpoint(dest) as ckpt:
        assert ckpt.metadata == {"format": "pt", "grown_by": "modelgrow"}
        assert ckpt.config == CONFIG
        for name, tensor in tensors.items():
            assert torch.equal(ckpt.get(name), tensor) and ckpt.get(name).dtype == tensor.dtype
    assert (dest / "config.json").read_text() == '{\n  "model_type": "gpt2",\n  "n_layer": 2\n}\n'
    assert leftovers(tmp_path) == []


def test_shards_are_packed_greedily_by_bytes(tmp_path):
    dest = tmp_path / "out"
    tensors = five_tensors()
    tensors["big"] = torch.zeros(500)  # 2000 bytes: over the limit, so a shard of its own
    tensors["t5"] = torch.full((25,), 5.0)  # 100 bytes
    files = write(dest, tensors, max_shard_bytes=1000)
    shards = [f.path for f in files if f.path.endswith(".safetensors")]
    assert shards == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 400 + 2000 + 100
    assert list(index["weight_map"]) == sorted(tensors)
    # [t0 t1] [t2 t3] [t4] [big] [t5]: t4+big would exceed 1000, big+t5 too.
    expected_shard = {"t0": 1, "t1": 1, "t2": 2, "t3": 2, "t4": 3, "big": 4, "t5": 5}
    for name, number in expected_shard.items():
        assert index["weight_map"][name] == f"model-0000{number}-of-00005.safetensors"
        assert torch.equal(load_file(dest / index["weight_map"][name])[name], tensors[name])
    with open_checkpoint(dest) as ckpt:
        assert ckpt.total_bytes() == index["metadata"]["total_size"]
        assert len(ckpt.files) == 5


def test_output_is_byte_identical_across_runs(tmp_path):
    # Many metadata keys: safetensors writes them in hash-map order, so this fails
    # unless the writer canonicalises the header.
    metadata = {f"key{i}": str(i) for i in range(12)}
    runs = []
    for run in range(2):
        dest = tmp_path / f"out{run}"
        files = write(dest, five_tensors(), max_shard_bytes=1000, metadata=metadata)
        runs.append([(f.path, f.sha256) for f in files])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 5  # 3 shards, index, config
    with open_checkpoint(tmp_path / "out0") as ckpt:
        assert ckpt.metadata == {"format": "pt", **metadata}


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"wte": base, "lm_head": base, "view": base[1:], "t": base.t()}
    write(tmp_path / "out", tensors)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name


def test_exception_inside_with_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with CheckpointWriter(dest, max_shard_bytes=500) as writer:
            for name, tensor in five_tensors().items():
                writer.add(name, tensor)  # several shards already on disk
            1 / 0
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_commit_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="without commit"):
        with CheckpointWriter(tmp_path / "out") as writer:
            writer.add("a", torch.ones(1))
    assert list(tmp_path.iterdir()) == []


def test_existing_dest_is_refused_without_overwrite(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists; pass --overwrite to replace it") as err:
        write(dest, five_tensors())
    assert err.value.exit_code == EXIT_OUTPUT
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_dest(tmp_path):
    dest = tmp_path / "out"
    write(dest, {"old": torch.zeros(2), "older": torch.zeros(2)}, max_shard_bytes=8)
    assert (dest / "model.safetensors.index.json").exists()
    write(dest, {"new": torch.ones(2)}, overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == [".modelgrow", "config.json", "model.safetensors"]
    assert list(load_file(dest / "model.safetensors")) == ["new"]
    assert leftovers(tmp_path) == []


def test_dest_created_meanwhile_is_left_alone(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(OutputError, match="created by another process"):
        with CheckpointWriter(dest) as writer:
            writer.add("a", torch.ones(2))
            dest.mkdir()
            (dest / "theirs.txt").write_text("x")
            writer.commit()
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_missing_parent_is_refused(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        CheckpointWriter(tmp_path / "no" / "out").__enter__()


def test_stale_temp_folder_of_dead_pid_is_removed(tmp_path):
    # A child that has exited and been reaped: its pid is (almost surely) not in use.
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(child.stdout)
    stale = tmp_path / f".out.modelgrow-tmp-{dead_pid}-abcd1234"
    alive = tmp_path / f".out.modelgrow-tmp-{os.getppid()}-abcd1234"
    other = tmp_path / f".other.modelgrow-tmp-{dead_pid}-abcd1234"
    for folder in (stale, alive, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"junk")
    write(tmp_path / "out", {"a": torch.ones(1)})
    assert not stale.exists()
    assert alive.exists() and other.exists()  # a live writer, and another destination's


def test_duplicate_names_and_reserved_side_files(tmp_path):
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=4) as writer:
        writer.add("a", torch.ones(1))
        writer.add("b", torch.ones(1))  # goes to a new shard; duplicates are still caught
        with pytest.raises(ValueError, match="added twice"):
            writer.add("a", torch.ones(1))
        with pytest.raises(ValueError, match="reserved"):
            writer.write_json("model.safetensors.index.json", {})
        with pytest.raises(ValueError, match="plain file name"):
            writer.write_json("../escape.json", {})
        writer.commit()


def test_copy_file_carries_content(tmp_path):
    src = tmp_path / "tokenizer.json"
    src.write_text('{"vocab": 1}')
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("a", torch.ones(1))
        writer.copy_file(src)
        files = writer.commit()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"vocab": 1}'
    assert "tokenizer.json" in [f.path for f in files]


def test_file_size_limit_becomes_no_space_error(tmp_path):
    # RLIMIT_FSIZE with SIGXFSZ ignored makes writes fail with EFBIG, like a full disk.
    dest = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with pytest.raises(OutputError, match="no space left writing") as err:
            with CheckpointWriter(dest) as writer:
                resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
                writer.add("big", torch.zeros(100_000))
                writer.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert err.value.exit_code == EXIT_OUTPUT
    assert list(tmp_path.iterdir()) == []


def test_enospc_from_os_becomes_no_space_error(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "save_file", full_disk)
    with pytest.raises(OutputError, match="no space left writing"):
        write(tmp_path / "out", five_tensors())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2_000_000_000),
        ("2gb", 2_000_000_000),
        ("1.5 GiB", 1_610_612_736),
        ("500 MB", 500_000_000),
        ("10KiB", 10_240),
        ("1TB", 10**12),
        ("1.1GB", 1_100_000_000),
        ("123", 123),
        (" 7 kb ", 7000),
        (42, 42),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "-1GB", "2 XB", "5B", "1.5", "2 G B", "1e9", None, True]
)
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


@pytest.mark.parametrize(
    "n, expected",
    [(0, "0 B"), (999, "999 B"), (1500, "1.5 KB"), (2_000_000_000, "2.0 GB"), (999_990, "1.0 MB")],
)
def test_format_size(n, expected):
    assert format_size(n) == expected
