"""A prompt opening shared by every row is computed once, with the same results as computing it per row."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from textenv.compat import cache_kwargs
from textenv.prefix import prefix_cache, split_shared_prefix


def _rows(rows: list[list[int]], width: int, *, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :], mask[r, width - len(row) :] = torch.tensor(row), 1
    return ids, mask


def test_split_finds_the_shared_opening_whatever_the_padding():
    ids, mask = _rows([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8, 11], [5, 6, 7, 8, 9, 12, 13]], width=9)
    shared = split_shared_prefix(ids, mask)
    assert shared.ids.tolist() == [[5, 6, 7, 8]]
    assert shared.rest_ids.shape == (3, 5)
    rests = [row[m.bool()].tolist() for row, m in zip(shared.rest_ids, shared.rest_mask, strict=True)]
    assert rests == [[9, 10], [11], [9, 12, 13]]
    # columns in cache order: prefix first, then the rest of each row
    assert shared.full_ids[1][shared.mask[1].bool()].tolist() == [5, 6, 7, 8, 11]
    assert split_shared_prefix(ids, mask, limit=2) is None  # too short to be worth a call
    assert split_shared_prefix(ids[:1], mask[:1]) is None  # one row: nothing to share
    same, same_mask = _rows([[5, 6, 7, 8, 9]] * 2, width=5)
    assert split_shared_prefix(same, same_mask).length == 4  # each row keeps a token to run on


def test_forward_through_the_shared_prefix_equals_the_plain_forward(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids, mask = _rows([[4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 10], [4, 5, 6, 7, 8, 11, 12]], width=8)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    shared = split_shared_prefix(ids, mask)
    cache = prefix_cache(model.base_model, shared, batch=3)
    full_mask = shared.mask
    rest_positions = (full_mask.cumsum(-1) - 1)[:, shared.length :]
    out = model(input_ids=shared.rest_ids, attention_mask=full_mask, position_ids=rest_positions,
                **cache_kwargs(model, cache))
    real = shared.rest_mask.bool()
    for r in range(3):
        torch.testing.assert_close(out.logits[r][real[r]], plain[r][mask[r].bool()][shared.length :], atol=1e-5, rtol=0)
