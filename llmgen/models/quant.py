"""Weights held as 8-bit integers, and the one interface every integer kernel sits behind.

Decoding one token at batch 1 streams every weight once, so its speed is the weights'
size over the memory bandwidth: int8 weights are a quarter of float32's bytes. What
makes that pay is a kernel that multiplies the integers directly. fbgemm's dynamic
int8 product (``torch.ops.quantized.linear_dynamic``) does what llama.cpp's Q8_0 path
does: it quantizes each step's activations to 8 bits too and runs integer dot products
(VNNI where the CPU has it), then scales the int32 sums back to float.

Weights are symmetric per output row: ``w[o, :] ~ scale[o] * q[o, :]`` with ``q`` in
[-127, 127], so row ``o`` of the product is ``scale[o] * (q[o] . x)``. The same rows
serve a tied embedding's lookup, so a tied model keeps one int8 copy for both.

fbgemm's quantized operators are deprecated in torch and will go; everything here
reaches them through ``Int8Weight`` alone (and the 4-bit kernel through
``quant4.Int4Weight``, which has the same interface), so a successor (torchao, a oneDNN int8
product) replaces one class, not the models. Where fbgemm is missing or disagrees
with the reference, the reference kernel (dequantize, then a float product) keeps
results right at float speed; ``LLMGEN_INT8_KERNEL=reference`` forces it.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from llmgen.models import quant4
from llmgen.models.quant4 import Int4Weight

KERNELS = ("fbgemm", "reference")
def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] as (int8 [out, in], float32 scale [out]), rounding to nearest, so
    each row's largest magnitude maps to 127 (an all-zero row gets scale 1)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@functools.cache
def kernel() -> str:
    """The int8 kernel this process uses: fbgemm if this torch has it and it agrees with
    the reference on a small product, else the reference."""
    chosen = os.environ.get("LLMGEN_INT8_KERNEL", "fbgemm")
    if chosen not in KERNELS:
        raise ValueError(f"LLMGEN_INT8_KERNEL={chosen!r}: expected one of {', '.join(KERNELS)}")
    if chosen == "reference" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return "reference"
    try:
        gen = torch.Generator().manual_seed(0)
        w, x = torch.randn(24, 64, generator=gen), torch.randn(3, 64, generator=gen)
        probe = Int8Weight(*quantize_rows(w), None, kernel_name="fbgemm")
        got, want = probe.linear(x), Int8Weight(probe.q, probe.scale, None, kernel_name="reference").linear(x)
        # Activations are quantized to 8 bits too: agreement to ~1% of the output's scale.
        return "fbgemm" if torch.allclose(got, want, atol=0.02 * float(want.abs().max())) else "reference"
    except (AttributeError, RuntimeError, NotImplementedError):
        return "reference"


# Each row's columns are turned, a block at a time, by an orthonormal Hadamard matrix H
# before quantizing, and each input the same way before its product: (w H)(x H)^T = w x^T.
# A few huge input values (models keep some in fixed channels) become many moderate ones,
# so the one scale fbgemm gives a whole input row costs little; w's outliers spread too.
# SmolLM2's decode, mean KL from float32 per token: 0.021 unturned; turned in blocks of
# 16, 0.0081; of 32, 0.0071; of 64, 0.0055 (llama.cpp's Q8_0: 0.0044). The same idea as
# QuaRot's rotations, on blocks small enough to divide any model's widths.
BLOCKS = (64, 32, 16)


def turn_block(width: int) -> int | None:
    """The widest block of BLOCKS that divides ``width`` (None: too odd a width to turn)."""
    return next((b for b in BLOCKS if width % b == 0), None)


@functools.cache
def hadamard(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix (Sylvester's, n a power of two) over sqrt(n): orthonormal
    and symmetric, so it is its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)))
    return h / n**0.5


def turn(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x``'s last dimension turned block by block: x H for each ``block``-wide block."""
    return (x.unflatten(-1, (x.shape[-1] // block, block)) @ hadamard(block)).flatten(-2)


class Int8Weight:
    """An int8 matrix with one scale per row, and an optional float bias: the only
    object that knows which kernel multiplies it. ``turned``: the block width of H when
    the rows hold w H (see BLOCKS), and inputs are turned to match; None if not."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel_name: str | None = None,
                 turned: int | None = None):
        self.shape = tuple(q.shape)
        self._q, self.scale, self.bias, self.turned = q, scale, bias, turned
        self.kernel = kernel_name or kernel()
        self.packed = self._pack() if self.kernel == "fbgemm" else None
        self.keeps_rows = False  # packed, the plain rows are only kept for an embedding's lookups

    @property
    def q(self) -> torch.Tensor:
        """The int8 rows: the plain copy, else unpacked from the kernel's layout."""
        if self._q is not None:
            return self._q
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def drop_rows(self) -> None:
        """Free the plain int8 rows once packed (the packed copy holds the same numbers);
        a table that also serves lookups keeps them."""
        if self.packed is not None and not self.keeps_rows:
            self._q = None

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, kernel_name: str | None = None) -> Int8Weight:
        """``w`` rounded to int8 rows, turned first where its width allows."""
        return cls(*rows_at_rest(w.detach()), None if bias is None else bias.detach().float(), kernel_name,
                   turn_block(w.shape[1]))

    def _pack(self):
        with warnings.catch_warnings():  # "quantized tensors are deprecated": known, see the module docstring
            warnings.simplefilter("ignore")
            zero = torch.zeros(self.q.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.q, self.scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T + bias`` for float32 ``x`` [..., in].

        fbgemm quantizes its whole input with one scale. Rows of like magnitude can share
        it, but a prompt's first token, where models keep huge "attention sink"
        activations, would crush every other row's values to a few levels (SmolLM2
        scoring a paragraph: KL 0.59 from float32, against 0.004 with rows apart). So the
        rows are grouped by the power of two of their peak, and each group is one call:
        a decode step is one row and one call, a prefill a handful of calls."""
        if self.packed is None:
            from llmgen.models.linear import linear

            return linear(x, self.dequantize(), self.bias)
        if self.turned:
            x = turn(x, self.turned)
        rows = x.numel() // x.shape[-1]
        if rows == 1:
            return self._fbgemm(x)
        flat = x.reshape(rows, x.shape[-1])
        octave = torch.frexp(flat.abs().amax(-1)).exponent  # (rows,): peak in [2^(e-1), 2^e)
        groups = torch.unique(octave)
        if len(groups) == 1:
            return self._fbgemm(x)
        out = torch.empty(rows, self.shape[0])
        for e in groups.tolist():
            at = (octave == e).nonzero().squeeze(1)
            out[at] = self._fbgemm(flat[at])
        return out.view(*x.shape[:-1], self.shape[0])

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: 8-bit activations, which VNNI's int32 accumulation takes
        # without the int16 saturation that reduce_range guards against on older CPUs.
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the matrix: an embedding lookup."""
        out = self._q[ids].float() * self.scale[ids].unsqueeze(-1)
        return turn(out, self.turned) if self.turned else out  # H is its own inverse

    def dequantize(self) -> torch.Tensor:
        """The float matrix these int8 rows stand for (turned back)."""
        out = self.q.float() * self.scale[:, None]
        return turn(out, self.turned) if self.turned else out

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed matrix, the plain rows if kept, the scales and the bias."""
        copies = (self.packed is not None) + (self._q is not None)
        return copies * self.shape[0] * self.shape[1] + 4 * self.scale.numel() + (0 if self.bias is None else 4 * self.bias.numel())


Quantized = Int8Weight | Int4Weight


class QuantizedLinear(nn.Module):
    """A ``Linear`` whose weight is quantized (no parameters: it does not train)."""

    def __init__(self, weight: Quantized) -> None:
        super().__init__()
        self.quantized = weight
        self.out_features, self.in_features = weight.shape
        weight.drop_rows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized.linear(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {FORMATS[type(self.quantized)]} ({self.quantized.kernel})"


class QuantizedEmbedding(nn.Module):
    """An embedding lookup from quantized rows; a tied model shares them with its head."""

    def __init__(self, weight: Quantized) -> None:
        super().__init__()
        self.quantized = weight
        weight.keeps_rows = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized.rows(ids)


FORMATS = {Int8Weight: "int8, one scale per row", Int4Weight: "Q4_0, one scale per 32 weights"}

# Quantized at rest (``llmgen convert --keep-quant``): a weight "x.weight" stored beside
# "x.weight_scale", and config.json's quantization_config naming this method. Int8 rows:
# int8 [out, in] with float32 scales [out], turned (``rows_at_rest``) where the config's
# "turned" says so. Q4_0 blocks: uint8 [out, in / 2] (two codes
# a byte, see quant4.pack_codes) with float16 scales [out, in / 32].
METHOD = "llmgen_int8_rows"
SCALE = "_scale"


@dataclass
class AtRest:
    """One weight as the checkpoint holds it quantized. ``turned``: int8 rows stored as
    ``w H`` (see BLOCKS), the block width of H; None where the rows are ``w`` itself."""

    ckpt_name: str
    q: torch.Tensor
    scale: torch.Tensor
    turned: int | None = None

    @property
    def blocks(self) -> bool:
        return self.q.dtype is torch.uint8

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix's own shape (two Q4_0 codes share a byte)."""
        return (self.q.shape[0], self.q.shape[1] * (2 if self.blocks else 1))

    def check(self, scale_name: str) -> None:
        rows, width = self.shape
        want = (rows, width // quant4.GROUP) if self.blocks else (rows,)
        if self.q.dtype not in (torch.int8, torch.uint8) or self.q.ndim != 2 or tuple(self.scale.shape) != want or (
                self.blocks and width % quant4.GROUP):
            raise ValueError(f"tensor {self.ckpt_name!r} ({self.q.dtype}, {list(self.q.shape)}) and its scales {scale_name!r} "
                             f"({list(self.scale.shape)}) are neither int8 rows with one scale each nor Q4_0 blocks")

    def dequantize(self) -> torch.Tensor:
        if self.blocks:
            return quant4.dequantize_blocks(quant4.unpack_codes(self.q), self.scale)
        rows = self.q.float() * self.scale.float()[:, None]
        return turn(rows, self.turned) if self.turned else rows  # H is its own inverse

    def weight(self, kind: str, bias: torch.Tensor | None) -> Quantized:
        """As a weight of ``kind`` ("int8", "int4", or "auto": as stored). Stored blocks and
        turned rows are used as they are; rows stored unturned (an older convert) are
        rounded again, turned, where the width allows (see Int8Weight.from_float)."""
        if kind == "int4" or (kind == "auto" and self.blocks):
            if self.blocks:
                return Int4Weight(quant4.unpack_codes(self.q), self.scale, bias)
            return _float_weight(self.dequantize(), bias, kind)
        if not self.blocks and (self.turned or turn_block(self.shape[1]) is None):
            return Int8Weight(self.q, self.scale.float(), bias, turned=self.turned)
        return Int8Weight.from_float(self.dequantize(), bias)


def rows_at_rest(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as convert --keep-quant stores int8 rows: turned where the width allows, as
    the kernel multiplies them, so loading them rounds nothing again."""
    block = turn_block(w.shape[1])
    return quantize_rows(turn(w.float(), block) if block else w)


def stored_columns(name: str, dtype: torch.dtype, width: int) -> int:
    """How many columns a checkpoint tensor of a ``width``-wide matrix has: Q4_0 blocks'
    scales one per 32 weights, their codes two a byte, anything else one a weight."""
    if name.endswith(SCALE):
        return width // quant4.GROUP
    return width // 2 if dtype is torch.uint8 else width


# {parameter name: the weight as stored}
Rows = dict[str, AtRest]


def take_rows(renamed: dict[str, tuple[str, torch.Tensor]], turned: bool = False) -> Rows:
    """Move every quantized-at-rest weight and its scales out of ``renamed`` (a checkpoint's
    ``{parameter name: (checkpoint name, tensor)}``), checking that they pair up.
    ``turned``: the checkpoint says its int8 rows are stored turned (``rows_at_rest``)."""
    out = {}
    for name in [n for n in renamed if n.endswith(SCALE)]:
        scale_name, scale = renamed.pop(name)
        weight = name.removesuffix(SCALE)
        if weight not in renamed:
            raise ValueError(f"tensor {scale_name!r} scales {weight!r}, which the checkpoint does not hold")
        ckpt_name, q = renamed.pop(weight)
        out[weight] = AtRest(ckpt_name, q, scale, turn_block(q.shape[1]) if turned and q.dtype is torch.int8 else None)
        out[weight].check(scale_name)
    return out


def dequantize_rows(rows: Rows, dtype: torch.dtype) -> dict[str, tuple[str, torch.Tensor]]:
    """Quantized-at-rest weights as ``dtype`` matrices, for a model loaded in floating point."""
    return {name: (held.ckpt_name, held.dequantize().to(dtype)) for name, held in rows.items()}


def _float_weight(w: torch.Tensor, bias: torch.Tensor | None, kind: str) -> Quantized:
    """A float matrix rounded to ``kind``; int4 falls back to int8 rows for a width that is
    not a multiple of Q4_0's block, as llama.cpp's quantizer falls back for such tensors."""
    bias = None if bias is None else bias.detach().float()
    if kind == "int4" and quant4.fits(tuple(w.shape)):
        return Int4Weight.from_float(w, bias)
    return Int8Weight.from_float(w, bias)


def quantize_model(model: nn.Module, rows: Rows | None = None, kind: str = "int8") -> None:
    """Replace every projection, the LM head and the token embedding (the attribute the
    model names in ``TOKEN_EMBEDDING``) by quantized ones of ``kind`` ("int8", "int4",
    or "auto": each stored weight as it is stored, float ones as int8), in place: from
    ``rows`` where the checkpoint held them quantized, else rounded here from the float
    weight. A tied model (``lm_head`` None) gets a head over the embedding's own rows.
    Each float weight is freed as its quantized copy is made, so memory never holds both
    whole models."""
    from llmgen.models.linear import Linear

    rows = rows if rows is not None else {}

    def quantized(name: str, module: nn.Module, bias: torch.Tensor | None = None) -> Quantized:
        if name in rows:  # popped, so its plain copy is freed once packed
            return rows.pop(name).weight(kind, None if bias is None else bias.detach().float())
        return _float_weight(module.weight, bias, kind)

    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                full = f"{prefix}.{name}" if prefix else name
                setattr(parent, name, QuantizedLinear(quantized(f"{full}.weight", child, child.bias)))
    table = quantized(f"{model.TOKEN_EMBEDDING}.weight", getattr(model, model.TOKEN_EMBEDDING))
    setattr(model, model.TOKEN_EMBEDDING, QuantizedEmbedding(table))
    if model.lm_head is None:
        model.lm_head = QuantizedLinear(table)


def quantized_weights(model: nn.Module) -> list[Quantized]:
    """The model's quantized matrices, each once (a tied model's table serves two modules)."""
    found = {}
    for module in model.modules():
        if isinstance(getattr(module, "quantized", None), Quantized):
            found.setdefault(id(module.quantized), module.quantized)
    return list(found.values())


def parameter_count(model: nn.Module) -> int:
    """What the model would count in float: its parameters plus its quantized matrices'
    entries (a tied table once)."""
    return sum(w.shape[0] * w.shape[1] + (0 if w.bias is None else w.bias.numel()) for w in quantized_weights(model)) + sum(
        p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and quantized matrix (with its scales), each counted once."""
    return sum(w.nbytes for w in quantized_weights(model)) + sum(p.numel() * p.element_size() for p in model.parameters())


def weights_format(model: nn.Module) -> str:
    """How the weights are held, for ``llmgen info``: their dtype, or the quantized formats
    and kernels (most matrices' first)."""
    found = quantized_weights(model)
    if found:
        kinds = sorted({type(w) for w in found}, key=lambda k: -sum(isinstance(w, k) for w in found))
        return " + ".join(f"{FORMATS[k]} ({next(w.kernel for w in found if isinstance(w, k))} kernel)" for k in kinds)
    return str(next(model.parameters()).dtype).removeprefix("torch.")
