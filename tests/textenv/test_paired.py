"""The paired LoRA forward: policy rows with adapters, reference rows without, in one pass over row slices."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from textenv.paired import BASE_ADAPTER, PolicyRows, adapter_per_row, lora_layers

peft = pytest.importorskip("peft")


@pytest.fixture
def adapted(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    wrapper = peft.get_peft_model(model, config)
    model.eval()
    return wrapper, model


def test_policy_rows_compute_the_adapted_and_the_base_model_without_peft_mixed_batches(adapted, monkeypatch):
    wrapper, model = adapted
    layers = lora_layers(model)
    ids = torch.randint(10, (6, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with adapter_per_row(layers, ["default"] * 3 + [BASE_ADAPTER] * 3):
            mixed = model(input_ids=ids).logits
        policy = model(input_ids=ids[:3]).logits
        with wrapper.disable_adapter():
            base = model(input_ids=ids[3:]).logits

        def refuse(*_, **__):
            raise AssertionError("peft's per-row index route was taken")

        monkeypatch.setattr(type(layers[0]), "_mixed_batch_forward", refuse)
        with PolicyRows(layers, "default").rows(3):
            paired = model(input_ids=ids).logits
    assert (policy - base).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(paired, mixed, atol=0, rtol=0)
    torch.testing.assert_close(paired[:3], policy, atol=1e-6, rtol=0)
    torch.testing.assert_close(paired[3:], base, atol=1e-6, rtol=0)
    assert all("forward" not in vars(layer) for layer in layers)  # the layers' own forward is back


def test_layers_the_fast_route_cannot_run_keep_peft_per_row_adapters(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    peft.get_peft_model(model, config)
    model.eval()
    layers = lora_layers(model)
    assert {type(layer).__name__ for layer in layers} == {"Linear", "Embedding"}
    ids = torch.randint(10, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with adapter_per_row(layers, ["default"] * 2 + [BASE_ADAPTER] * 2):
            expected = model(input_ids=ids).logits
        with PolicyRows(layers, "default").rows(2):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_prepared_row_forwards_follow_later_changes_to_the_adapters(adapted):
    wrapper, model = adapted
    layers = lora_layers(model)
    prepared = PolicyRows(layers, "default")  # made once, entered at every decoding step
    ids = torch.randint(10, (4, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with prepared.rows(2):
            before = model(input_ids=ids).logits
        for layer in layers:
            layer.scaling["default"] *= 3.0  # peft's set_scale / scale_layer write here
        with adapter_per_row(layers, ["default"] * 2 + [BASE_ADAPTER] * 2):
            expected = model(input_ids=ids).logits
        with prepared.rows(2):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert (got[:2] - before[:2]).abs().max() > 1e-3  # the policy rows changed with the scale
        wrapper.merge_adapter()  # the base weights now hold the adapters: row slices would add them twice
        with pytest.raises(ValueError, match="merged adapters"), prepared.rows(2):
            model(input_ids=ids)
