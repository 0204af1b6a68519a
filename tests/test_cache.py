"""The KV cache's row moves: ``follow`` (beam steps, in place) must equal ``reorder``."""

import pytest
import torch

from llmgen.cache import KVCache


def _filled_cache(batch: int, length: int, padding: bool) -> KVCache:
    cache = KVCache(2, batch, 3, 9, 4, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(batch * 10 + length)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    if padding:
        cache.set_padding(torch.tensor([[0] * r + [1] * (length - r) for r in range(batch)]))
    cache.advance(length)
    return cache


@pytest.mark.parametrize(
    "parents",
    [[0, 1, 2, 3], [0, 0, 1, 2], [1, 0, 3, 2], [3, 3, 3, 3], [2, 0, 1, 1], [1, 2, 3, 0]],
)
@pytest.mark.parametrize("padding", [False, True])
def test_follow_equals_reorder_on_filled_slots(parents, padding):
    ours, expected = _filled_cache(4, 6, padding), _filled_cache(4, 6, padding)
    ours.follow(parents)
    expected.reorder(torch.tensor(parents))
    n = expected.length
    assert torch.equal(ours.k[..., :n, :], expected.k[..., :n, :])
    assert torch.equal(ours.v[..., :n, :], expected.v[..., :n, :])
    assert (ours.key_mask is None) == (expected.key_mask is None)
    if padding:
        assert torch.equal(ours.key_mask, expected.key_mask)
