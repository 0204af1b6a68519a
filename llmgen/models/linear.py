"""The matrix multiply every layer and LM head goes through.

Decoding one token at batch size 1 is a chain of matrix-vector products, so its speed
is the speed of streaming the weights. On CPU in float32, ``F.linear`` hands these to
MKL, which on the machine we measured streams at 15-25 GB/s; oneDNN's inner product,
reached through ``torch.ops.mkldnn._linear_pointwise``, reads the same row-major
weight at about 29 GB/s and stays ahead at batch 4-16 and for 512-token prefills
(``bench/run.py``; README, Performance). bfloat16 already goes to oneDNN through
``F.linear``; float16 is not supported by oneDNN's CPU inner product, so both keep
``F.linear``.

oneDNN has no backward here, so the fast path is taken only where autograd is off
(``torch.inference_mode`` / ``no_grad``, which every decoder uses); training is
untouched. ``LLMGEN_ONEDNN=0`` turns it off, to compare or to rule it out.

A loaded model goes one step further (``pack_linears``): each projection's weight is
reordered once into oneDNN's blocked layout, replacing the dense copy, so memory does
not grow; ``state_dict`` then holds the packed tensors. Read once per step from memory,
as decoding reads them, packed weights stream faster than dense ones at every row count
(below), one row included.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's float32 inner product and it agrees with
    ``F.linear`` (checked once on a small product)."""
    if os.environ.get("LLMGEN_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3, 16), (8, 16), (8,)))
        with torch.no_grad():
            out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return torch.allclose(out, F.linear(x, w, b), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


# oneDNN chooses a packed layout for the number of rows it is told to expect. One might
# expect the 1-row layout to suit a single sequence's decode, but in a whole decode step,
# where every weight is read once from memory (not from cache), the 16-row layout reads
# faster at every row count we use, 1 included. Measured on a 2-core AMD EPYC, whole
# decode steps at batch 1, ms (1-row layout -> 16-row layout): GPT-2-124M shape 24.3 ->
# 19.3 (1 thread) and 15.4 -> 10.6 (2 threads); Qwen3-0.6B shape 110 -> 83 (1 thread);
# SmolLM2-135M 21.8 -> 18.7 (2 threads). For 2-16 rows (beams, samples, batches) and
# 512-row prefills it was already the faster one.
PACK_FOR_ROWS = 16


def pack_linears(model: nn.Module) -> None:
    """Replace every float32 CPU ``Linear`` weight by its oneDNN-packed form, in place.

    Inference only: a packed weight has no gradient and only oneDNN can read it. The
    tied embedding (read as rows by the lookup) is left dense."""
    if not onednn_available():
        return
    for module in model.modules():
        w = module.weight if isinstance(module, Linear) else None
        if w is not None and w.device.type == "cpu" and w.dtype is torch.float32 and not w.is_mkldnn:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_FOR_ROWS)
            module.weight = nn.Parameter(packed, requires_grad=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN when that is faster and autograd is not recording."""
    if weight.is_mkldnn or (  # packed by pack_linears: only oneDNN reads it
        x.dtype is torch.float32
        and x.device.type == "cpu"
        and weight.dtype is torch.float32
        and not torch.is_grad_enabled()
        and onednn_available()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same ``state_dict``) whose forward is ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
