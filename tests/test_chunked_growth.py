"""Large tensors are grown a slice of rows at a time (modelgrow.checkpoint.sizes.row_parts).

The slice size is a constant of a few hundred MB, so tiny models never reach it: these
tests shrink it to a few hundred bytes, so that every vocabulary-sized tensor of a tiny
model is grown in several slices, and check that nothing a user sees changes: without
noise the bytes are those of the whole-tensor growth, and with the default cancelling
noise the grown model still computes what the source does (Hugging Face transformers).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import tiny
from modelgrow import grow
from modelgrow.checkpoint.reader import open_checkpoint
from modelgrow.checkpoint import sizes as base
from modelgrow.plan import GrowthSpec
from test_copy_growth import MAKERS, load_hf, outputs


@pytest.fixture
def small_parts(monkeypatch):
    """Slices of at most 512 bytes of fp32 (4 rows of a 32-wide tensor)."""
    monkeypatch.setattr(grow, "row_parts", lambda shape: base.row_parts(shape, 512))


def grown_tensors(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_row_parts_cover_the_rows_once():
    parts = base.row_parts((10, 3), part_bytes=4 * 3 * 4)  # 4 rows per part
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 8), (8, 10)]
    assert base.row_parts((10, 3)) == [slice(0, 10)]  # small: one part
    assert base.row_parts((5,), part_bytes=1) == [slice(i, i + 1) for i in range(5)]


def test_reading_rows_reads_exactly_those_rows(tmp_path):
    src = tiny.gpt2(tmp_path / "src")
    with open_checkpoint(src) as ckpt:
        whole = ckpt.get("transformer.wte.weight")
        assert torch.equal(ckpt.get("transformer.wte.weight", slice(7, 19)), whole[7:19])
        assert torch.equal(ckpt.get("transformer.wte.weight", slice(90, None)), whole[90:])
        assert ckpt.get("transformer.wte.weight", slice(5, 5)).shape == (0, whole.shape[1])


@pytest.mark.parametrize("maker,width", [("gpt2", "2x"), ("gpt2-untied", "48"), ("llama-gqa", "2x"), ("bert-mlm", "48")])
def test_sliced_growth_without_noise_is_the_whole_growth_byte_for_byte(tmp_path, monkeypatch, maker, width):
    src = MAKERS[maker](tmp_path / "src")
    spec = GrowthSpec(width=width)
    grow.convert(src, tmp_path / "whole", spec, operator_options={"noise": 0.0}, verify=False, progress=False)
    monkeypatch.setattr(grow, "row_parts", lambda shape: base.row_parts(shape, 512))
    grow.convert(src, tmp_path / "sliced", spec, operator_options={"noise": 0.0}, verify=False, progress=False)
    whole, sliced = grown_tensors(tmp_path / "whole"), grown_tensors(tmp_path / "sliced")
    assert whole.keys() == sliced.keys()
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


@pytest.mark.parametrize("maker", ["gpt2-untied", "llama-gqa"])
def test_sliced_growth_with_cancelling_noise_is_exact(tmp_path, small_parts, maker):
    src = MAKERS[maker](tmp_path / "src")
    report = grow.convert(src, tmp_path / "grown", GrowthSpec(width="2x", depth="2x"), verify=True,
                          progress=False)
    assert report["verify"]["passed"] and report["promise"]["exact"]
    small, _ = load_hf(src)
    big, _ = load_hf(tmp_path / "grown")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    assert (outputs(small, ids) - outputs(big, ids)).abs().max().item() < 1e-4
    # The head's rows were grown in slices, each with its own noise: the noise is there.
    grow.convert(src, tmp_path / "quiet", GrowthSpec(width="2x", depth="2x"), operator_options={"noise": 0.0},
                 verify=False, progress=False)
    noisy, quiet = grown_tensors(tmp_path / "grown")["lm_head.weight"], grown_tensors(tmp_path / "quiet")["lm_head.weight"]
    assert (noisy - quiet).abs().max() > 0


def test_sliced_growth_is_deterministic(tmp_path, small_parts):
    src = tiny.llama(tmp_path / "src")
    for out in ("a", "b"):
        grow.convert(src, tmp_path / out, GrowthSpec(width="2x"), verify=False, progress=False)
    a, b = grown_tensors(tmp_path / "a"), grown_tensors(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_verification_reads_large_tensors_in_slices_to_the_same_values(tmp_path, monkeypatch):
    from modelgrow import streamed

    src = tiny.llama(tmp_path / "src")
    grow.convert(src, tmp_path / "bf16", GrowthSpec(width="2x"), dtype="bf16", verify=False, progress=False)
    with open_checkpoint(tmp_path / "bf16") as ckpt:
        name = "model.embed_tokens.weight"
        whole = streamed.read_float(ckpt, name, torch.float16)
        monkeypatch.setattr(streamed, "row_parts", lambda shape: base.row_parts(shape, 512))
        sliced = streamed.read_float(ckpt, name, torch.float16)
        assert sliced.dtype == torch.float32 and torch.equal(whole, sliced)
        assert torch.equal(sliced, ckpt.get(name).to(torch.float16).float())
    # The whole verification, slices and all, reaches the verdict of the default reads.
    report = grow.convert(src, tmp_path / "checked", GrowthSpec(width="2x"), dtype="bf16", verify=True, progress=False)
    assert report["verify"]["passed"]


def test_upcycled_growth_slices_what_the_operator_grows_and_nothing_it_makes(tmp_path, monkeypatch):
    src = tiny.llama(tmp_path / "src")
    spec = GrowthSpec(experts=4, top_k=2, width="2x")
    grow.convert(src, tmp_path / "whole", spec, operator_options={"noise": 0.0}, verify=False, progress=False)
    monkeypatch.setattr(grow, "row_parts", lambda shape: base.row_parts(shape, 512))
    report = grow.convert(src, tmp_path / "sliced", spec, operator_options={"noise": 0.0}, verify=True, progress=False)
    assert report["verify"]["passed"]
    whole, sliced = grown_tensors(tmp_path / "whole"), grown_tensors(tmp_path / "sliced")
    assert whole.keys() == sliced.keys()
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


@pytest.mark.parametrize("index,old,tiles", [([0, 1, 2, 0, 1, 2], 3, 2), ([0, 1, 0, 1, 0, 1], 2, 3),
                                             ([0, 0, 1, 2, 1, -1], 3, None)],
                         ids=["two-tiles", "three-tiles", "uneven-with-padding"])
def test_cancelling_noise_sums_to_zero_over_each_units_copies(index, old, tiles):
    """The fast paths (two whole copies: e and -e; k copies: a copies dimension) and the
    general one (a gather) all give noise that cancels over the copies of every unit."""
    from modelgrow.maps import _with_counts
    from modelgrow.operators.copy import _cancelling_noise, tile_count

    m = _with_counts(torch.tensor(index), old)
    assert tile_count(m) == tiles
    for axis in (0, 1):
        shape = (len(index), 5) if axis == 0 else (5, len(index))
        noise = _cancelling_noise(torch.Size(shape), axis, m, 0.5, torch.Generator().manual_seed(0))
        valid = torch.tensor([i >= 0 for i in index])
        moved = noise.movedim(axis, 0)[valid]
        sums = torch.zeros(old, 5).index_add_(0, torch.tensor(index)[valid], moved)
        assert sums.abs().max() < 1e-6 and moved.abs().max() > 0.01
        assert 0.2 < float(moved.std()) < 0.8  # about the scale asked for


@pytest.mark.parametrize("axis", [0, 1])
def test_the_two_copy_split_equals_the_general_one(axis):
    """2x width's direct write (w/2 + e, w/2 - e) gives the general path's values: the same
    draws, the same spread, to fp32 rounding of that spread."""
    from modelgrow.maps import _with_counts
    from modelgrow.operators.copy import CopyOperator, _cancelling_noise

    w = torch.randn(6, 7, generator=torch.Generator().manual_seed(1))
    old = w.shape[axis]
    m = _with_counts(torch.arange(2 * old) % old, old)
    op = CopyOperator.__new__(CopyOperator)
    op.noise, op.noise_mode = 0.01, "exact"
    fast = op._split(w, axis, m, torch.Generator().manual_seed(0))
    reps = [1, 1]
    reps[axis] = 2
    general = w.repeat(reps).div_(2)
    general += _cancelling_noise(general.shape, axis, m, 0.01 * float(general.std()), torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fast, w.repeat(reps) / 2)  # the noise is there


def test_a_written_tensor_leaves_nothing_of_itself_behind(tmp_path, monkeypatch):
    """Once a tensor is written, nothing in the conversion still holds it (the sliced
    embedding included): memory is the tensors waiting to be written, not a shard or
    the model. With nothing allowed ahead, every earlier tensor is checked each time
    the writer waits for the writes before the next one."""
    import weakref

    from modelgrow.checkpoint import planned

    src = tiny.llama(tmp_path / "src")
    monkeypatch.setattr(grow, "row_parts", lambda shape: base.row_parts(shape, 512))
    monkeypatch.setattr(planned, "WRITE_AHEAD", 0)
    given, put, settle = [], planned.PlannedShards.put, planned.PlannedShards._settle

    def spy_put(self, name, tensor):
        given.append((name, weakref.ref(tensor)))
        put(self, name, tensor)

    def spy_settle(self, room):
        settle(self, room)
        assert [name for name, ref in given[:-1] if ref() is not None] == []

    monkeypatch.setattr(planned.PlannedShards, "put", spy_put)
    monkeypatch.setattr(planned.PlannedShards, "_settle", spy_settle)
    grow.convert(src, tmp_path / "out", GrowthSpec(width="2x"), max_shard_size=1, verify=False, progress=False)
    assert "model.embed_tokens.weight" in dict(given) and len(given) > 10
    assert all(ref() is None for _, ref in given)
