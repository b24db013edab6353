"""LiGO's attention expansions as in the paper (issue #17; modelgrow/operators/ligo_attention.py):

- K and V have separate out-expansions (B_K, B_V) that part ways in a fit;
- O's input expansion is V's output one (times the fixed copy split, broadcast over the
  query heads of a kv group under GQA) before, during and after a fit: it is no parameter;
- so is the FFN down projection's input expansion: the FFN out-expansion times the copy
  split (plus its fixed exact noise), for dense, gated, expert and shared-expert FFNs;
- rows mix across heads where positions are a learned table (GPT-2, BERT), whole heads
  move where they may be rotary (Llama, GPT-NeoX) or a tensor is per head (Qwen3);
- the grown model at init is exact (verify passes, with exact noise) for GPT-2, Llama
  with GQA and BERT, and the pre-flight's count is the operator's, exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from modelgrow.fit import prepare_fit
from modelgrow.grow import convert
from modelgrow.layout import Layout, builtin_layout_paths
from modelgrow.operators import ligo_attention
from modelgrow.operators.copy import CopyOperator
from modelgrow.operators.ligo import LiGOOperator
from modelgrow.operators.ligo_attention import Attention, fixed_numbers, head_mixing, kv_slots
from modelgrow.plan import GrowthSpec, make_plan
from modelgrow.source import open_source

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

LAYOUTS = {p.stem: p for p in builtin_layout_paths()}


def layout(name: str) -> Layout:
    return Layout.from_file(LAYOUTS[name])


@pytest.mark.parametrize("maker,groups", [(tiny.gpt2, 1), (tiny.llama, 2)], ids=["gpt2", "llama-gqa"])
def test_key_and_value_part_ways_and_o_and_the_ffn_input_stay_tied(tmp_path, maker, groups):
    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, 3000).astype(np.int32))
    with open_source(maker(tmp_path / "src")) as source:
        op = LiGOOperator(make_plan(source, GrowthSpec(width="2x")), noise=0.01)
        params = op.parameters()
        assert {"width.out.query.0", "width.out.key.0", "width.out.value.0", "width.out.ffn.0"} <= set(params)
        assert not any(k.startswith(("width.out.kv.", "width.in.attn.", "width.in.ffn.")) for k in params)  # tied
        split = op.buffers["split.width.in.attn.0"]  # 1/copies per row: each row starts on one unit
        ffn_split, ffn_noise = op.buffers["split.width.in.ffn.0"], op.buffers["noise.width.in.ffn.0"].clone()
        assert torch.equal(ffn_split, torch.full((ffn_split.numel(),), 0.5))  # every FFN unit copied twice
        assert torch.allclose(ffn_noise.view(2, -1, ffn_noise.shape[1]).sum(0), torch.zeros(()), atol=1e-7)  # zero-sum
        start = {k: v.detach().clone() for k, v in params.items()}
        assert torch.equal(start["width.out.key.0"], start["width.out.value.0"])  # both the copy map

        prepare_fit(op, {"data": [ids], "steps": 3, "batch_size": 2, "seq_len": 16, "lr": 1e-2, "warmup": 0,
                         "eval_batches": 0, "device": "cpu"}).run(progress=False)
        key, value = op.params["width.out.key.0"].detach(), op.params["width.out.value.0"].detach()
        assert not torch.equal(key, value) and not torch.equal(value, start["width.out.value.0"])
        tied = split[:, None] * torch.kron(value, torch.eye(groups)) + op.buffers["noise.width.in.attn.0"]
        assert torch.allclose(op.expansion("width.in.attn.0").detach(), tied, rtol=0, atol=1e-7)
        ffn = op.params["width.out.ffn.0"].detach()  # the down projection's input follows the moved E_ffn
        assert not torch.equal(ffn, start["width.out.ffn.0"])
        assert torch.equal(op.buffers["noise.width.in.ffn.0"], ffn_noise)  # the offset stays fixed
        tied = ffn_split[:, None] * ffn + ffn_noise
        assert torch.allclose(op.expansion("width.in.ffn.0").detach(), tied, rtol=0, atol=1e-7)


def test_rows_mix_for_a_position_table_whole_heads_for_rotary(tmp_path):
    with open_source(tiny.gpt2(tmp_path / "gpt2")) as source:  # 4 heads of 8 -> 8 heads: units 32 -> 64
        op = LiGOOperator(make_plan(source, GrowthSpec(width="2x")), noise=0.0)
        assert op.describe_options()["attention"]["mixing"] == "rows"
        assert {k: tuple(op.params[f"width.out.{k}.0"].shape) for k in ("query", "key", "value")} == {
            "query": (64, 32), "key": (64, 32), "value": (64, 32)}
    with open_source(tiny.llama(tmp_path / "llama")) as source:  # 4 -> 8 query heads, 2 -> 4 kv heads
        op = LiGOOperator(make_plan(source, GrowthSpec(width="2x")), noise=0.0)
        assert op.describe_options()["attention"]["mixing"] == "heads"
        assert {k: tuple(op.params[f"width.out.{k}.0"].shape) for k in ("query", "key", "value")} == {
            "query": (8, 4), "key": (4, 2), "value": (4, 2)}


def test_rows_with_grouped_query_attention_start_at_the_copy(tmp_path, monkeypatch):
    """No built-in family has both; forced, O's tie broadcasts B_V row by row over each group."""
    monkeypatch.setattr(ligo_attention, "head_mixing", lambda layout, config: (True, "forced"))
    with open_source(tiny.llama(tmp_path / "src")) as source:
        plan = make_plan(source, GrowthSpec(width="1.5x"))  # 4 -> 6 query heads, 2 -> 3 kv heads of 8
        op, copy = LiGOOperator(plan, noise=0.0), CopyOperator(plan, noise=0.0)
        assert tuple(op.params["width.out.value.0"].shape) == (24, 16)
        for target in plan.targets:
            assert torch.equal(op.tensor(target), copy.tensor(target)), target.name
        value = torch.randn(24, 16)  # any B_V: [3 kv heads x 8 rows, 2 x 8]
        op.params["width.out.value.0"] = value
        s_o = op.expansion("width.in.attn.0")  # [6 query heads x 8 rows, 4 x 8]; query head (g, j) reads kv head g
        copies = [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]  # of the query head each new one starts on (6 = 0 1 2 3 0 1)
        for new in range(6):
            for old in range(4):
                block = s_o[new * 8:(new + 1) * 8, old * 8:(old + 1) * 8]
                want = value[new // 2 * 8:(new // 2 + 1) * 8, old // 2 * 8:(old // 2 + 1) * 8] / copies[new]
                assert torch.equal(block, want if new % 2 == old % 2 else torch.zeros(8, 8)), (new, old)


def test_the_rules_read_roles_and_config_values():
    assert head_mixing(layout("gpt2"), {"n_positions": 32})[0]
    assert head_mixing(layout("bert"), {"position_embedding_type": "absolute"})[0]
    assert head_mixing(layout("vit"), {})[0]
    assert not head_mixing(layout("gpt2"), {"rope_theta": 1e4})[0]  # a rotary setting wins over the table
    assert not head_mixing(layout("bert"), {"position_embedding_type": "relative_key"})[0]
    assert not head_mixing(layout("gpt_neox"), {"rotary_pct": 0.25})[0]
    assert not head_mixing(layout("llama"), {})[0]  # no position table: may be rotary
    assert not head_mixing(layout("qwen3"), {})[0]
    assert not head_mixing(layout("gpt2"), {"text_config": {"partial_rotary_factor": 0.5}})[0]
    assert head_mixing(layout("gpt2"), {"property_rope": None, "europe": 1})[0]  # unset, or not the word
    slots = kv_slots(layout("llama"))
    assert slots["model.layers.${layer}.self_attn.k_proj.weight"] == "key"
    assert slots["model.layers.${layer}.self_attn.v_proj.bias"] == "value"
    assert kv_slots(layout("olmo2"))["model.layers.${layer}.self_attn.k_norm.weight"] == "key"
    assert kv_slots(layout("gpt2")) == {}  # fused q|k|v: the key, then the value, on the axis


CASES = [("gpt2", tiny.gpt2, GrowthSpec(width="2x", depth="3")),
         ("llama-gqa", tiny.llama, GrowthSpec(width="1.5x")),
         ("bert", tiny.bert, GrowthSpec(width="2x"))]


@pytest.mark.parametrize("maker,spec", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_grown_model_is_exact_at_init(tmp_path, maker, spec):
    report = convert(maker(tmp_path / "src"), tmp_path / "out", spec, operator="ligo",
                     operator_options={"noise": 0.01, "noise_mode": "exact"}, fit_options={"steps": 0},
                     verify=True, progress=False)
    assert report["promise"]["exact"] and report["verify"]["passed"], report["verify"]
    options = report["operator"]["options"]
    assert options["ffn_input"] == {"ffn": "tied to its out-expansion (diag(1/copies) · E)"}
    assert options["tied_matrices"] == 2 * report["plan"]["target"]["layers"]  # O's and the FFN's input per layer


STATE = [(tiny.gpt2, GrowthSpec(width="1.5x", depth="3")),
         (tiny.llama, GrowthSpec(width="2x", kv_heads="2")),  # query heads per kv head change: O's input is free
         (tiny.bert, GrowthSpec(width="2x", depth="2x"))]


@pytest.mark.parametrize("maker,spec", STATE, ids=["gpt2-pad", "llama-free-o", "bert"])
def test_the_state_estimate_is_the_operators_count(tmp_path, maker, spec):
    with open_source(maker(tmp_path / "src")) as source:
        op = LiGOOperator(make_plan(source, spec), noise=0.01)
        assert sum(t.numel() for t in op.params.values()) == LiGOOperator.state_params(source, op.plan.new, {})
        tied = op.describe_options()["attention"]["output_input"] == "tied to value"
        assert tied == ("width.in.attn.0" not in op.params) and "width.in.ffn.0" not in op.params
        fixed = fixed_numbers(Attention.of(source.layout, source.config, source.dims, op.plan.new), source.specs(),
                              source.dims, op.plan.new, noise=True)
        assert sum(t.numel() for t in op.buffers.values()) == fixed  # state_bytes counts the buffers too


def test_the_ffn_tie_halves_the_ffn_numbers(tmp_path, monkeypatch):
    """Tiny GPT-2 2x/2x: one 256 x 128 FFN matrix per target layer instead of two."""
    with open_source(tiny.gpt2(tmp_path / "src")) as source:
        plan = make_plan(source, GrowthSpec(width="2x", depth="2x"))
        tied = sum(t.numel() for t in LiGOOperator(plan, noise=0.0).params.values())
        assert tied == LiGOOperator.state_params(source, plan.new, {}) == 159_840
        monkeypatch.setattr(ligo_attention, "FFN_ROLES", ())  # the FFN's input free, as before
        free = LiGOOperator(plan, noise=0.0)
        assert "width.in.ffn.0" in free.params and LiGOOperator.state_params(source, plan.new, {}) == 290_912
        assert sum(t.numel() for t in free.params.values()) - tied == plan.new.layers * 256 * 128


def test_expert_and_shared_expert_ffn_inputs_are_tied(tmp_path):
    from test_families import causal_lm

    with open_source(causal_lm(tmp_path / "src", "qwen2_moe")) as source:
        plan = make_plan(source, GrowthSpec(width="2x", depth="3"))
        op, copy = LiGOOperator(plan, noise=0.0), CopyOperator(plan, noise=0.0)
        tied = "tied to its out-expansion (diag(1/copies) · E)"
        assert op.describe_options()["ffn_input"] == {"expert_ffn": tied, "shared_ffn": tied}
        assert not any(k.startswith(("width.in.expert_ffn.", "width.in.shared_ffn.")) for k in op.params)
        assert sum(t.numel() for t in op.params.values()) == LiGOOperator.state_params(source, plan.new, {})
        for target in plan.targets:
            assert torch.equal(op.tensor(target), copy.tensor(target)), target.name
        e = op.params["width.out.expert_ffn.1"] = torch.randn(48, 24)  # any E: every expert's input follows it
        assert torch.equal(op.expansion("width.in.expert_ffn.1"), e / 2)
