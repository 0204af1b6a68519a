"""What each llama.cpp architecture writes, read back as transformers' layout.

A GGUF names tensors its own way (``blk.3.attn_q``), stores a few of them transformed
(Llama's Q/K rows permuted for interleaved rotary, Gemma's norms as ``1 + w``, GPT-NeoX's
fused q/k/v regrouped, GPT-2's Conv1D matrices turned into ``nn.Linear``'s order), and
keeps the hyperparameters under ``{arch}.*`` keys, leaving out some that llama.cpp
derives from the model size. Each ``Arch`` below undoes one architecture's choices so
that the directory written loads through the same family readers as a checkpoint
downloaded in the Hugging Face layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llmgen.convert.metadata import MAX_CONTEXT, Fields
from llmgen.errors import ModelError
from llmgen.models.gpt2 import CONV1D_SUFFIXES

LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
POST_NORMS = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
SANDWICH = {**POST_NORMS, "ffn_norm": "pre_feedforward_layernorm"}  # Gemma 2/3: four norms a layer


@dataclass(frozen=True)
class Arch:
    model_type: str
    layer: dict = field(default_factory=dict)  # additions to / replacements of LLAMA_LAYER
    top: dict = field(default_factory=lambda: LLAMA_TOP)
    prefix: str = "model.layers"
    norm_offset: float = 0.0  # stored norm weight = HF weight + offset
    permuted_qk: bool = False  # Q/K rows interleaved for llama.cpp's rotary (Llama only)
    qkv_by_kind: bool = False  # fused q/k/v stored as all q, all k, all v (GPT-NeoX)
    config: Callable[[Fields, dict], dict] | None = None  # family keys on top of the shared ones
    base_layer: dict = field(default_factory=lambda: LLAMA_LAYER)
    shapes: dict = field(default_factory=dict)  # additions to / replacements of SHAPES
    transposed: tuple[str, ...] = ()  # HF names whose float weight is stored [in, out] (GPT-2's Conv1D)
    kept_float: tuple[str, ...] = ()  # HF names read as tables, not multiplied: dequantized even by --keep-quant
    hf_config: Callable[[dict], dict] | None = None  # config.json in the family's own key names

    def parse(self, name: str) -> tuple[int | None, str, str]:
        """``blk.3.attn_q.weight`` -> ``(3, "attn_q", "weight")``, ``output.weight`` ->
        ``(None, "output", "weight")``; ValueError for a name this family does not have."""
        parts = name.split(".")
        if parts[0] == "blk":
            if len(parts) < 2 or not (parts[1].isascii() and parts[1].isdigit() and len(parts[1]) < 1000):
                raise ValueError(f"tensor {name!r} has no layer index (a layer's tensors are named blk.N.KIND.weight)")
            if len(parts) != 4:
                raise ValueError(f"tensor {name!r} is not named as a layer's tensors are (blk.N.KIND.weight or .bias)")
            layer, kind, leaf, known = int(parts[1]), parts[2], parts[3], {**self.base_layer, **self.layer}
        else:
            layer, kind, leaf, known = None, parts[0], ".".join(parts[1:]), self.top
        if kind not in known or leaf not in ("weight", "bias"):
            raise ValueError(f"tensor {name!r} has no Hugging Face counterpart llmgen knows for {self.model_type}")
        return layer, kind, leaf

    def hf_name(self, name: str) -> str:
        """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
        layer, kind, leaf = self.parse(name)
        if layer is None:
            return f"{self.top[kind]}.{leaf}"
        layers = {**self.base_layer, **self.layer}
        return f"{self.prefix}.{layer}.{layers[kind]}.{leaf}"

    def shape(self, kind: str, leaf: str) -> tuple[str, ...]:
        """The dimensions of a tensor in PyTorch's order, named as in ``dimensions``."""
        weight = self.shapes.get(kind) or SHAPES[kind]
        return weight if leaf == "weight" else weight[:1]  # a bias spans its weight's rows

    def float_layout(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """A float weight as the family's checkpoints store it. Quantized rows keep
        ``nn.Linear``'s order, rows being what they scale."""
        return w.t() if w.ndim == 2 and name.endswith(self.transposed) else w

    def keeps_quantized(self, name: str) -> bool:
        """Whether ``--keep-quant`` may keep this tensor quantized: a matrix the model multiplies."""
        return name not in self.kept_float

    def restore(self, name: str, w: torch.Tensor, cfg: dict) -> torch.Tensor:
        """Undo what llama.cpp's converter did to this tensor (``name`` is the HF name)."""
        if self.norm_offset and name.endswith("norm.weight"):
            return w - self.norm_offset
        if self.permuted_qk and name.endswith("self_attn.q_proj.weight"):
            return unpermute(w, cfg["num_attention_heads"])
        if self.permuted_qk and name.endswith("self_attn.k_proj.weight"):
            return unpermute(w, cfg["num_key_value_heads"])
        if self.qkv_by_kind and ".attention.query_key_value." in name:
            return interleave_qkv(w, cfg["num_attention_heads"])
        return w


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in Q/K rows."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleave_qkv(w: torch.Tensor, heads: int) -> torch.Tensor:
    """GPT-NeoX keeps q, k and v per head (``heads, 3, head_dim``); llama.cpp stores all
    of q, then k, then v. Put them back per head."""
    return w.reshape(3, heads, w.shape[0] // 3 // heads, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def width_per_head(f: Fields, cfg: dict) -> int:
    """The embedding width split evenly over the query heads: the head size of every
    family that does not store one."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if hidden % heads:
        raise f.error(f.arch_key("attention.head_count"),
                      f"is {heads}, which does not divide {f.arch_key('embedding_length')} ({hidden}) into heads of one size")
    return hidden // heads


def _head_dim(f: Fields, cfg: dict) -> int:
    return f.integer(f.arch_key("attention.key_length"), None) or width_per_head(f, cfg)


def _rotated_fraction(f: Fields, head_dim: int) -> float:
    return f.integer(f.arch_key("rope.dimension_count"), head_dim, high=head_dim) / head_dim


def _qwen3(f: Fields, cfg: dict) -> dict:
    return {"head_dim": _head_dim(f, cfg)}


def _phi3(f: Fields, cfg: dict) -> dict:
    """The rotated fraction comes as a dimension count; the window is on every layer."""
    window = f.integer(f.arch_key("attention.sliding_window"), None, low=0)
    return {"partial_rotary_factor": _rotated_fraction(f, width_per_head(f, cfg)), "sliding_window": window or None}


def _gemma(f: Fields, cfg: dict) -> dict:
    return {"head_dim": _head_dim(f, cfg), "hidden_activation": "gelu_pytorch_tanh"}


def _query_scalar(cfg: dict, head_dim: int, large_layers: int) -> float:
    """llama.cpp does not store ``query_pre_attn_scalar``: it scales by the head size,
    except on the 27B models (told apart by their layer count), which use hidden/heads."""
    if cfg["num_hidden_layers"] == large_layers:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return head_dim


def _gemma2(f: Fields, cfg: dict) -> dict:
    out = _gemma(f, cfg)
    return {
        **out,
        "attn_logit_softcapping": f.number(f.arch_key("attn_logit_softcapping"), None),
        "final_logit_softcapping": f.number(f.arch_key("final_logit_softcapping"), None),
        "sliding_window": f.integer(f.arch_key("attention.sliding_window"), 4096),
        "query_pre_attn_scalar": _query_scalar(cfg, out["head_dim"], large_layers=46),
    }


def _sliding_layers(f: Fields, layers: int) -> list[bool]:
    """Which layers of a Gemma 3 attend through the window: newer files list them, older
    ones give the period of the full-attention layer, and the oldest imply 5 of every 6."""
    key = f.arch_key("attention.sliding_window_pattern")
    if isinstance(f.get(key), list):
        pattern = f.array(key, (bool,))
        if len(pattern) != layers:
            raise f.error(key, f"has {len(pattern)} entries, but {f.arch_key('block_count')} is {layers}")
        return pattern
    every = f.integer(key, 6)
    return [(i + 1) % every != 0 for i in range(layers)]


def _gemma3(f: Fields, cfg: dict) -> dict:
    """Gemma 3's sliding layers rotate with base 10000, which llama.cpp fixes rather than stores."""
    out = _gemma(f, cfg)
    sliding = _sliding_layers(f, cfg["num_hidden_layers"])
    return {
        **out,
        "sliding_window": f.integer(f.arch_key("attention.sliding_window"), 512),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": _query_scalar(cfg, out["head_dim"], large_layers=62),
        "final_logit_softcapping": f.number(f.arch_key("final_logit_softcapping"), None),
    }


def _neox(f: Fields, cfg: dict) -> dict:
    """Pythia's own key names; LayerNorm with biases, an untied head."""
    return {
        "rotary_pct": _rotated_fraction(f, width_per_head(f, cfg)),
        "rotary_emb_base": cfg.pop("rope_theta"),
        "use_parallel_residual": f.flag(f.arch_key("use_parallel_residual"), True),
        "layer_norm_eps": f.number(f.arch_key("attention.layer_norm_epsilon"), 1e-5, positive=False),
        "hidden_act": "gelu",
    }


def _gpt2(f: Fields, cfg: dict) -> dict:
    """LayerNorm's epsilon; every head the same width, with no rotary to size it."""
    width_per_head(f, cfg)
    return {"layer_norm_epsilon": f.number(f.arch_key("attention.layer_norm_epsilon"), 1e-5, positive=False)}


GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "max_position_embeddings": "n_positions", "intermediate_size": "n_inner"}
GPT2_UNUSED = ("num_key_value_heads", "rms_norm_eps", "rope_theta", "hidden_act")  # no GQA, RMSNorm or rotary


def _gpt2_hf_config(cfg: dict) -> dict:
    """transformers' GPT2Config names: ``n_embd`` for ``hidden_size`` and so on."""
    out = {GPT2_NAMES.get(k, k): v for k, v in cfg.items() if k not in GPT2_UNUSED}
    return {**out, "n_ctx": out["n_positions"], "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"]}


GPT2_TOP = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
            "output": "lm_head"}
GPT2_LAYER = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
NEOX_TOP = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out"}
NEOX_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "attention.query_key_value",
    "attn_output": "attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}

ARCHS = {  # GGUF general.architecture -> how to read it
    "llama": Arch("llama", permuted_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3", layer=QK_NORMS, config=_qwen3),
    "phi3": Arch("phi3", layer={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}, config=_phi3,
                 shapes={"ffn_up": ("2*ffn", "hidden")}),  # gate and up stacked
    "olmo2": Arch("olmo2", layer={**QK_NORMS, **POST_NORMS}, shapes={"attn_q_norm": ("q",), "attn_k_norm": ("kv",)}),
    "gemma": Arch("gemma", norm_offset=1.0, config=_gemma),
    "gemma2": Arch("gemma2", layer=SANDWICH, norm_offset=1.0, config=_gemma2),
    "gemma3": Arch("gemma3_text", layer={**SANDWICH, **QK_NORMS}, norm_offset=1.0, config=_gemma3),
    "gpt2": Arch("gpt2", top=GPT2_TOP, base_layer=GPT2_LAYER, prefix="transformer.h", config=_gpt2,
                 transposed=CONV1D_SUFFIXES, kept_float=("transformer.wpe.weight",), hf_config=_gpt2_hf_config),
    "gptneox": Arch("gpt_neox", top=NEOX_TOP, base_layer=NEOX_LAYER, prefix="gpt_neox.layers",
                    qkv_by_kind=True, config=_neox),
}
REFUSED_TENSORS = {  # tensors that mean a feature llmgen does not implement
    "rope_freqs.weight": "llama3 rope frequencies (rope_freqs.weight)",
    "rope_factors_long.weight": "longrope scaling (rope_factors_long.weight)",
    "rope_factors_short.weight": "longrope scaling (rope_factors_short.weight)",
}


def gguf_config(f: Fields) -> tuple[Arch, dict]:
    """The file's architecture and the ``config.json`` it implies."""
    if f.arch not in ARCHS:
        raise ModelError(f"GGUF architecture {f.arch!r} is not supported (supported: {', '.join(ARCHS)})")
    arch = ARCHS[f.arch]
    names = {t.name for t in f.reader.tensors}
    for tensor, feature in REFUSED_TENSORS.items():
        if tensor in names:
            raise ModelError(f"this GGUF stores {feature}, which llmgen does not convert yet")
    cfg = {
        "model_type": arch.model_type,
        "vocab_size": _vocab_size(f),
        "hidden_size": f.integer(f.arch_key("embedding_length")),
        "intermediate_size": f.integer(f.arch_key("feed_forward_length")),
        "num_hidden_layers": _block_count(f, arch),
        **_heads(f),
        "max_position_embeddings": f.integer(f.arch_key("context_length"), 2048, high=MAX_CONTEXT),
        "rms_norm_eps": f.number(f.arch_key("attention.layer_norm_rms_epsilon"), 1e-6, positive=False),
        "rope_theta": f.number(f.arch_key("rope.freq_base"), 1_000_000.0 if f.arch == "gemma3" else 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
    }
    cfg.update(_llama_head_dim(f, cfg) if arch.config is None else arch.config(f, cfg))
    cfg.update(_rope_scaling(f))
    for key in ("bos_token_id", "eos_token_id"):
        value = f.token_id(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key] = value
    return arch, cfg


def _vocab_size(f: Fields) -> int:
    """The rows of the embedding: the stored count, else one per token of the file."""
    tokens = len(f.tokens())
    key = f.arch_key("vocab_size")
    size = f.integer(key, tokens)
    if size < tokens:
        raise f.error(key, f"is {size}, fewer than the {tokens} tokens of tokenizer.ggml.tokens")
    return size


def _heads(f: Fields) -> dict:
    heads_key, kv_key = f.arch_key("attention.head_count"), f.arch_key("attention.head_count_kv")
    heads = f.integer(heads_key)
    kv = f.integer(kv_key, heads)
    if heads % kv:
        raise f.error(kv_key, f"is {kv}, which does not divide {heads_key} ({heads}): "
                              "each key/value head must serve the same number of query heads")
    return {"num_attention_heads": heads, "num_key_value_heads": kv}


def _llama_head_dim(f: Fields, cfg: dict) -> dict:
    """Llama-like files give the head size as the rotary dimension count; ``head_dim``
    goes in the config only when it is not hidden/heads, as transformers writes it."""
    rotary = f.integer(f.arch_key("rope.dimension_count"), None)
    if rotary is None or rotary * cfg["num_attention_heads"] == cfg["hidden_size"]:
        width_per_head(f, cfg)
        return {}
    return {"head_dim": rotary}


def _rope_scaling(f: Fields) -> dict:
    key = f.arch_key("rope.scaling.type")
    scaling = f.text(key, None)
    if scaling == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": f.number(f.arch_key("rope.scaling.factor"))}}
    if scaling not in (None, "none"):
        raise ModelError(f"{f.path}: GGUF rope scaling {scaling!r} ({key}) is not supported")
    return {}


# Each tensor's weight in PyTorch's order (rows, columns), in the dimensions of
# ``dimensions``; the families' ``shapes`` replace some. A bias spans its weight's rows.
SHAPES = {
    "token_embd": ("vocab", "hidden"), "output": ("vocab", "hidden"), "output_norm": ("hidden",),
    "position_embd": ("context", "hidden"),
    "attn_norm": ("hidden",), "ffn_norm": ("hidden",), "post_attention_norm": ("hidden",), "post_ffw_norm": ("hidden",),
    "attn_q": ("q", "hidden"), "attn_k": ("kv", "hidden"), "attn_v": ("kv", "hidden"), "attn_output": ("hidden", "q"),
    "attn_qkv": ("q+2*kv", "hidden"), "attn_q_norm": ("head",), "attn_k_norm": ("head",),
    "ffn_gate": ("ffn", "hidden"), "ffn_up": ("ffn", "hidden"), "ffn_down": ("hidden", "ffn"),
}
# The metadata each dimension comes from, for the message when a tensor disagrees.
DIMENSION_KEYS = {
    "hidden": ("embedding_length",), "ffn": ("feed_forward_length",), "2*ffn": ("feed_forward_length",),
    "head": ("attention.head_count",), "q": ("attention.head_count",), "kv": ("attention.head_count_kv",),
    "q+2*kv": ("attention.head_count", "attention.head_count_kv"), "context": ("context_length",),
}


def dimensions(cfg: dict) -> dict[str, int]:
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, ffn = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head, cfg["intermediate_size"]
    return {"vocab": cfg["vocab_size"], "hidden": cfg["hidden_size"], "ffn": ffn, "2*ffn": 2 * ffn,
            "head": head, "q": q, "kv": kv, "q+2*kv": q + 2 * kv, "context": cfg["max_position_embeddings"]}


def check_tensors(f: Fields, arch: Arch, cfg: dict) -> None:
    """Every tensor's shape against the one the metadata implies, before any is converted
    (the names and layers were checked with ``block_count``)."""
    dims = dimensions(cfg)
    if arch.permuted_qk and dims["head"] % 2:  # the head size is stored as the rotary count, else implied
        key = "rope.dimension_count" if "head_dim" in cfg else "attention.head_count"
        raise f.error(f.arch_key(key), f"gives heads of {dims['head']} dimensions: rotary embeddings need an even head size")
    for t in f.reader.tensors:
        _, kind, leaf = arch.parse(t.name)
        expected = arch.shape(kind, leaf)
        actual = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if actual != tuple(dims[d] for d in expected):
            raise ModelError(f"{f.path}: tensor {t.name!r} has shape {list(actual)}, but the metadata gives "
                             f"{[dims[d] for d in expected]} ({_keys_behind(f, expected)})")


def _block_count(f: Fields, arch: Arch) -> int:
    """``block_count``, once every tensor name is one of this family's and the layers they
    hold are exactly ``blk.0`` to ``blk.{block_count - 1}``, each with the same tensors:
    checked before anything is sized by it."""
    count = f.integer(f.arch_key("block_count"))
    parsed = {}
    for t in f.reader.tensors:
        try:
            parsed[t.name] = arch.parse(t.name)
        except ValueError as e:
            raise ModelError(f"{f.path}: {e}") from None
    for needed in [f"{kind}.weight" for kind in arch.top if kind != "output"]:  # the head may be tied
        if needed not in parsed:
            raise ModelError(f"{f.path}: no tensor {needed!r}")
    layers: dict[int, set[str]] = {}
    for layer, kind, leaf in parsed.values():
        if layer is not None:
            layers.setdefault(layer, set()).add(f"{kind}.{leaf}")
    if len(layers) != count or max(layers) != count - 1:  # distinct indices from 0: exactly 0 .. count-1
        raise f.error(f.arch_key("block_count"), f"is {count}, but the tensors hold {_layers_held(layers)}")
    first = layers[0]
    for index, kinds in sorted(layers.items()):
        odd = sorted(first ^ kinds)
        if odd:
            has, lacks = (0, index) if odd[0] in first else (index, 0)
            raise ModelError(f"{f.path}: layer {lacks} has no tensor 'blk.{lacks}.{odd[0]}', which layer {has} has")
    return count


def _layers_held(layers: dict) -> str:
    if not layers:
        return "no layer (no tensor named blk.N.*)"
    last = max(layers)
    gap = next((i for i in range(last) if i not in layers), None)
    if gap is not None:
        return f"layers up to blk.{last} with none for layer {gap}"
    return f"{last + 1} layer{'s' if last else ''} (blk.0 to blk.{last})"


def _keys_behind(f: Fields, dims: tuple[str, ...]) -> str:
    vocab = f.arch_key("vocab_size") if f.get(f.arch_key("vocab_size")) is not None else "tokenizer.ggml.tokens"
    keys = [vocab if d == "vocab" else f.arch_key(k) for d in dims for k in DIMENSION_KEYS.get(d, (d,))]
    return ", ".join(dict.fromkeys(keys))
