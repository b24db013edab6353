"""ReLoRA building blocks on real transformers modules (GPT-2 Conv1D and Llama Linear)."""

from __future__ import annotations

import torch

import tiny
from modelgrow.engine.schedule import jagged_cosine
from modelgrow.relora import LoRAAdapter, add_adapters, prune_moments, remove_adapters
from modelgrow.source import load_module, open_source


def _module(tmp_path, maker):
    with open_source(maker(tmp_path / "m")) as src:
        return load_module(src), src.layout


def _train_adapters(model, adapters, ids, steps=3):
    opt = torch.optim.AdamW([p for a in adapters for p in (a.lora_A, a.lora_B)], lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_adapters_cover_every_layer_matrix_and_start_neutral(tmp_path):
    for maker, expected in ((tiny.gpt2, 4 * 2), (tiny.llama, 7 * 2)):
        model, layout = _module(tmp_path / maker.__name__, maker)
        ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
        before = model(input_ids=ids).logits
        adapters = add_adapters(model, layout, rank=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
        assert len(adapters) == expected  # c_attn, c_proj, c_fc, c_proj | q, k, v, o, gate, up, down
        assert all(a.lora_A.abs().sum() > 0 and not a.lora_B.any() for a in adapters)  # A drawn, B zero
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
        # Embeddings, norms and head stay trainable; adapted weights are frozen.
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert all(n.endswith("base.weight") for n in frozen) and len(frozen) == expected


def test_merge_preserves_function_for_both_storage_layouts(tmp_path):
    for maker in (tiny.gpt2, tiny.llama):
        model, layout = _module(tmp_path / maker.__name__, maker)
        ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
        adapters = add_adapters(model, layout, rank=4, alpha=8, dropout=0.0, generator=torch.Generator().manual_seed(0))
        _train_adapters(model, adapters, ids)
        with torch.no_grad():
            trained = model(input_ids=ids).logits
            for a in adapters:
                a.merge()
            assert all(not a.lora_B.any() for a in adapters)
            assert torch.allclose(model(input_ids=ids).logits, trained, atol=1e-5)
            remove_adapters(model)
            assert not any(isinstance(m, LoRAAdapter) for m in model.modules())
            assert torch.allclose(model(input_ids=ids).logits, trained, atol=1e-5)


def test_redraw_is_identical_for_identical_seeds(tmp_path):
    model, layout = _module(tmp_path, tiny.llama)
    a = add_adapters(model, layout, 4, 8, 0.0, torch.Generator().manual_seed(0))[0]
    a.redraw(torch.Generator().manual_seed(7))
    first = a.lora_A.clone()
    a.redraw(torch.Generator().manual_seed(7))
    assert torch.equal(first, a.lora_A)
    a.redraw(torch.Generator().manual_seed(8))
    assert not torch.equal(first, a.lora_A)


def test_prune_moments_uses_one_mask(tmp_path):
    model, layout = _module(tmp_path, tiny.gpt2)
    adapters = add_adapters(model, layout, 4, 8, 0.0, torch.Generator().manual_seed(0))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    opt = _train_adapters(model, adapters, ids)
    params = [a.lora_A for a in adapters]
    prune_moments(opt, params, 0.9)
    for p in params:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        zero = m == 0
        assert 0.85 <= zero.float().mean() <= 0.95
        assert torch.equal(zero, v == 0)  # joint mask
    prune_moments(opt, params, 1.0)
    assert all(not opt.state[p]["exp_avg"].any() for p in params)
    assert opt.state[params[0]]["step"] > 0  # step count kept


def test_jagged_cosine_schedule():
    lr = [jagged_cosine(s, total=400, warmup=20, cycle=100, restart_warmup=10) for s in range(400)]
    assert lr[0] == 1 / 20 and lr[19] == 1.0
    assert lr[100] == 0.0 and lr[200] == 0.0 and lr[300] == 0.0  # drop to zero at each merge
    assert 0 < lr[105] < lr[110]  # re-warming
    assert abs(lr[110] - jagged_cosine(110, 400, 20, None, 10)) < 1e-12  # back on the cosine
    assert min(lr[20:]) >= 0 and abs(jagged_cosine(399, 400, 20, None, 10) - 0.1) < 1e-3  # 10% floor
