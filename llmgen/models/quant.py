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
reaches them through ``Int8Weight`` alone, so a successor (torchao, a oneDNN int8
product) replaces one class, not the models. Where fbgemm is missing or disagrees
with the reference, the reference kernel (dequantize, then a float product) keeps
results right at float speed; ``LLMGEN_INT8_KERNEL=reference`` forces it.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import nn

KERNELS = ("fbgemm", "reference")
# How rows of one product are quantized (see Int8Weight.linear): together while their
# peaks are within this factor of each other (at most a bit lost), else one at a time up
# to PER_ROW rows, else not at all (a float product on the dequantized matrix).
SHARED_RANGE = 2.0
PER_ROW = 4


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
        w = w.detach().float()
        block = turn_block(w.shape[1])
        return cls(*quantize_rows(turn(w, block) if block else w), None if bias is None else bias.detach().float(),
                   kernel_name, block)

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
        scoring a paragraph: KL 0.59 from float32, against 0.004 with float activations).
        So rows share one call only while their peaks are within ``SHARED_RANGE`` of each
        other; else up to ``PER_ROW`` rows go one at a time (each streams the int8 matrix
        again, still no more bytes than float32 once), and more, as in a prefill, are
        multiplied by the dequantized matrix in float, a cost the many rows share."""
        if self.packed is None:
            from llmgen.models.linear import linear

            return linear(x, self.dequantize(), self.bias)
        if self.turned:
            x = turn(x, self.turned)
        rows = x.numel() // x.shape[-1]
        if rows > 1:
            flat = x.reshape(rows, x.shape[-1])
            peaks = flat.abs().amax(-1)
            if float(peaks.max()) > SHARED_RANGE * float(peaks.min()):
                if rows > PER_ROW:  # x is turned already: multiply by the turned rows
                    from llmgen.models.linear import linear

                    return linear(x, self._dequantized_rows(), self.bias)
                out = torch.cat([self._fbgemm(r) for r in flat.split(1)])
                return out.view(*x.shape[:-1], self.shape[0])
        return self._fbgemm(x)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=False: 8-bit activations, which VNNI's int32 accumulation takes
        # without the int16 saturation that reduce_range guards against on older CPUs.
        return torch.ops.quantized.linear_dynamic(x, self.packed, False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the matrix: an embedding lookup."""
        out = self._q[ids].float() * self.scale[ids].unsqueeze(-1)
        return turn(out, self.turned) if self.turned else out  # H is its own inverse

    def _dequantized_rows(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def dequantize(self) -> torch.Tensor:
        """The float matrix these int8 rows stand for (turned back)."""
        out = self._dequantized_rows()
        return turn(out, self.turned) if self.turned else out

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed matrix, the plain rows if kept, the scales and the bias."""
        copies = (self.packed is not None) + (self._q is not None)
        return copies * self.shape[0] * self.shape[1] + 4 * self.scale.numel() + (0 if self.bias is None else 4 * self.bias.numel())


class QuantizedLinear(nn.Module):
    """A ``Linear`` whose weight is an ``Int8Weight`` (no parameters: it does not train)."""

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.int8 = weight
        self.out_features, self.in_features = weight.shape
        weight.drop_rows()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8.linear(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 ({self.int8.kernel})"


class QuantizedEmbedding(nn.Module):
    """An embedding lookup from int8 rows; a tied model shares them with its head."""

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.int8 = weight
        weight.keeps_rows = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.int8.rows(ids)


# Int8 at rest (``llmgen convert --keep-quant``): a weight "x.weight" stored as int8 rows,
# beside "x.weight_scale" (float32, one per row), and config.json's quantization_config
# naming this method.
METHOD = "llmgen_int8_rows"
SCALE = "_scale"

# {parameter name: (checkpoint name, int8 rows, scales)}
Rows = dict[str, tuple[str, torch.Tensor, torch.Tensor]]


def take_rows(renamed: dict[str, tuple[str, torch.Tensor]]) -> Rows:
    """Move every int8-at-rest weight and its scales out of ``renamed`` (a checkpoint's
    ``{parameter name: (checkpoint name, tensor)}``), checking that they pair up."""
    out = {}
    for name in [n for n in renamed if n.endswith(SCALE)]:
        scale_name, scale = renamed.pop(name)
        weight = name.removesuffix(SCALE)
        if weight not in renamed:
            raise ValueError(f"tensor {scale_name!r} scales {weight!r}, which the checkpoint does not hold")
        ckpt_name, q = renamed.pop(weight)
        if q.dtype is not torch.int8 or q.ndim != 2 or tuple(scale.shape) != (q.shape[0],):
            raise ValueError(f"tensor {ckpt_name!r} ({q.dtype}, {list(q.shape)}) and its scales {scale_name!r} "
                             f"({list(scale.shape)}) are not int8 rows with one scale each")
        out[weight] = (ckpt_name, q, scale.float())
    return out


def dequantize_rows(rows: Rows, dtype: torch.dtype) -> dict[str, tuple[str, torch.Tensor]]:
    """Int8-at-rest weights as ``dtype`` matrices, for a model loaded in floating point."""
    return {name: (ckpt_name, (q.float() * scale[:, None]).to(dtype)) for name, (ckpt_name, q, scale) in rows.items()}


def quantize_model(model: nn.Module, rows: Rows | None = None) -> None:
    """Replace every projection, the LM head and the token embedding (the attribute the
    model names in ``TOKEN_EMBEDDING``) by int8 ones, in place: from ``rows`` where the
    checkpoint held them as int8, else rounded here from the float weight. A tied model
    (``lm_head`` None) gets a head over the embedding's own int8 rows. Each float weight
    is freed as its int8 copy is made, so memory never holds both whole models."""
    from llmgen.models.linear import Linear

    rows = rows if rows is not None else {}

    def int8(name: str, module: nn.Module, bias: torch.Tensor | None = None) -> Int8Weight:
        if name in rows:  # popped, so its plain rows are freed once packed; turned (and so rounded again) here
            _, q, scale = rows.pop(name)
            if turn_block(q.shape[1]) is None:
                return Int8Weight(q, scale, None if bias is None else bias.detach().float())
            return Int8Weight.from_float(q.float() * scale[:, None], bias)
        return Int8Weight.from_float(module.weight, bias)

    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                full = f"{prefix}.{name}" if prefix else name
                setattr(parent, name, QuantizedLinear(int8(f"{full}.weight", child, child.bias)))
    table = int8(f"{model.TOKEN_EMBEDDING}.weight", getattr(model, model.TOKEN_EMBEDDING))
    setattr(model, model.TOKEN_EMBEDDING, QuantizedEmbedding(table))
    if model.lm_head is None:
        model.lm_head = QuantizedLinear(table)


def int8_weights(model: nn.Module) -> list[Int8Weight]:
    """The model's int8 matrices, each once (a tied model's table serves two modules)."""
    found = {}
    for module in model.modules():
        if isinstance(getattr(module, "int8", None), Int8Weight):
            found.setdefault(id(module.int8), module.int8)
    return list(found.values())


def parameter_count(model: nn.Module) -> int:
    """What the model would count in float: its parameters plus its int8 matrices' entries
    (a tied table once)."""
    return sum(w.shape[0] * w.shape[1] + (0 if w.bias is None else w.bias.numel()) for w in int8_weights(model)) + sum(
        p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and int8 matrix (with its scales), each counted once."""
    return sum(w.nbytes for w in int8_weights(model)) + sum(p.numel() * p.element_size() for p in model.parameters())


def weights_format(model: nn.Module) -> str:
    """How the weights are held, for ``llmgen info``: their dtype, or the int8 kernel."""
    found = int8_weights(model)
    if found:
        return f"int8, one scale per row ({found[0].kernel} kernel)"
    return str(next(model.parameters()).dtype).removeprefix("torch.")
