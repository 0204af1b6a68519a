"""Weights held as 4-bit integers in llama.cpp's Q4_0 format, and the kernel that multiplies them.

Q4_0 cuts each row into blocks of 32 weights that share one scale ``d``: a weight is
``(c - 8) * d`` for a 4-bit code ``c`` in [0, 15]. That is 4.5 bits a weight, so a
decode step streams half of int8's bytes. llmgen keeps the blocks as they are, codes
and float16 scales, whether they come from a GGUF file (``convert --keep-quant``, bit
for bit) or are rounded here at load with llama.cpp's own rule (``--dtype int4``).

The kernel is aten's ``_weight_int4pack_mm_for_cpu``, whose dequantization,
``(c - 8) * scale + zero`` per group of 32 with the zero at 0, is Q4_0's exactly. It is
fast only with bfloat16 activations and scales (float32 runs a scalar loop, 20-30x
slower), so the input and the block scales are rounded to bfloat16 and the output
comes back in bfloat16: each costs a relative 2^-9 at most, well under what 4-bit
weights themselves move a product by. (llama.cpp rounds its activations further: to
8 bits in blocks of 32, for its Q4_0 x Q8_0 dot product.) The kernel needs a multiple
of 16 rows, so a matrix with another count (GPT-2's 50,257-token head) is padded with
zero rows that the output drops. As with int8, nothing but ``Int4Weight`` knows the
kernel, so a faster one (torchao's, a future aten op) replaces one class.
"""

from __future__ import annotations

import functools
import os

import torch

GROUP = 32  # weights a scale covers: Q4_0's block
ROWS_MULTIPLE = 16  # the kernel's packing wants the output rows in multiples of this
KERNELS = ("aten", "reference")


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] (``in`` a multiple of 32) as Q4_0 blocks: (codes uint8 [out, in] in
    [0, 15], scales float16 [out, in / 32]). llama.cpp's rule: the block's weight of
    largest magnitude, sign kept, is ``-8 d``, and codes are ``x / d + 8.5`` truncated."""
    out, width = w.shape
    blocks = w.detach().float().reshape(out, width // GROUP, GROUP)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    d = peak / -8  # codes are rounded against d in float32; it is stored in float16
    inverse = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    codes = (blocks * inverse[..., None] + 8.5).clamp_(0, 15).to(torch.uint8)  # truncation towards 0, as (int8_t) does
    return codes.reshape(out, width), d.half()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] as bytes [out, in / 2]: column 2i in the low nibble, 2i + 1 in the high."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2)


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 matrix of codes [out, in] and scales [out, in / 32]."""
    out, width = codes.shape
    values = (codes.float() - 8).reshape(out, width // GROUP, GROUP) * scale.float()[..., None]
    return values.reshape(out, width)


def gguf_q4_0(raw, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Q4_0 tensor's bytes as (codes [rows, width], float16 scales [rows, width / 32]),
    exactly as stored. A block is 18 bytes: d (float16), then 16 bytes whose low nibbles
    are the block's weights 0-15 and high nibbles its weights 16-31."""
    blocks = torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8).reshape(rows, width // GROUP, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    qs = blocks[..., 2:]
    codes = torch.cat((qs & 0xF, qs >> 4), -1)
    return codes.reshape(rows, width), d


def fits(shape: tuple[int, int]) -> bool:
    """Whether a matrix of this shape can be held as Q4_0 blocks."""
    return shape[1] % GROUP == 0


@functools.cache
def kernel() -> str:
    """aten's int4 product if this torch has it and it agrees with the reference on a
    small product, else the reference (dequantize, then a float product)."""
    chosen = os.environ.get("LLMGEN_INT4_KERNEL", "aten")
    if chosen not in KERNELS:
        raise ValueError(f"LLMGEN_INT4_KERNEL={chosen!r}: expected one of {', '.join(KERNELS)}")
    if chosen == "reference" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "reference"
    try:
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(24, 64, generator=gen), torch.randn(3, 64, generator=gen)
        codes, scale = quantize_blocks(w)
        got = Int4Weight(codes, scale, None, kernel_name="aten").linear(x)
        want = Int4Weight(codes, scale, None, kernel_name="reference").linear(x)
        return "aten" if torch.allclose(got, want, atol=0.02 * float(want.abs().max())) else "reference"
    except (AttributeError, RuntimeError, NotImplementedError):
        return "reference"


class Int4Weight:
    """A matrix of Q4_0 blocks and an optional float bias: the only object that knows the
    int4 kernel. Same interface as ``quant.Int8Weight``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel_name: str | None = None):
        self.shape = tuple(codes.shape)
        self.scale, self.bias = scale.half(), bias
        self.kernel = kernel_name or kernel()
        self._packed_codes = pack_codes(codes)  # [out, in / 2]: for lookups, dequantizing and saving
        self.packed = self._pack(codes) if self.kernel == "aten" else None
        self.keeps_rows = False

    def _pack(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = -self.shape[0] % ROWS_MULTIPLE
        codes, scale = codes.to(torch.int32), self.scale.float()
        if pad:  # zero rows (code 8 is the value 0), dropped from the output
            codes = torch.cat((codes, torch.full((pad, self.shape[1]), 8, dtype=torch.int32)))
            scale = torch.cat((scale, torch.zeros(pad, scale.shape[1])))
        weights = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scales_and_zeros = torch.stack((scale.T, torch.zeros_like(scale.T)), -1).to(torch.bfloat16).contiguous()  # (in/32, out, 2)
        return weights, scales_and_zeros

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, kernel_name: str | None = None) -> Int4Weight:
        return cls(*quantize_blocks(w), None if bias is None else bias.detach().float(), kernel_name)

    @property
    def codes(self) -> torch.Tensor:
        return unpack_codes(self._packed_codes)

    def drop_rows(self) -> None:
        """Free the plain codes once packed for the kernel, unless lookups need them."""
        if self.packed is not None and not self.keeps_rows:
            self._packed_codes = None

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T + bias`` for float32 ``x`` [..., in]."""
        if self.packed is None:
            from llmgen.models.linear import linear

            return linear(x, self.dequantize(), self.bias)
        weights, scales_and_zeros = self.packed
        flat = x.reshape(-1, self.shape[1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, weights, GROUP, scales_and_zeros)  # (rows, out padded)
        out = out[:, : self.shape[0]].float()
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.shape[0])

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the matrix: an embedding lookup."""
        picked = self._packed_codes[ids.flatten()]
        return dequantize_blocks(unpack_codes(picked), self.scale[ids.flatten()]).view(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        if self._packed_codes is None:
            raise RuntimeError("the plain codes were dropped once packed")
        return dequantize_blocks(self.codes, self.scale)

    @property
    def nbytes(self) -> int:
        """Bytes held: the kernel's packed codes and bfloat16 scales, the plain codes if kept,
        the float16 scales and the bias."""
        half = self.shape[0] * self.shape[1] // 2
        packed = 0 if self.packed is None else sum(t.numel() * t.element_size() for t in self.packed)
        plain = 0 if self._packed_codes is None else half
        return packed + plain + 2 * self.scale.numel() + (0 if self.bias is None else 4 * self.bias.numel())
