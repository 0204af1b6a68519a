"""The rotary decoder (models/decoder.py, read by models/families.py) against transformers' Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2 and Gemma 1, 2 and 3 on random weights."""

import pytest
import torch

from checkpoints import assert_logits_match, build_llama
from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.beam import BeamConfig, beam_search
from llmgen.decoding.greedy_sample import Row, generate, generate_batch

PROMPTS = ["I like", "The quick brown fox", "naïve café 日本"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-mha-linear-rope": ("llama", {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3, "rope_theta": 500000.0}),
    "qwen2-gqa-tied-bias": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    # A sliding window of 4 on every layer, crossed by every prompt and continuation here.
    "mistral-window": ("mistral", {"sliding_window": 4}),
    # Qwen3: q/k norms, and a head_dim that is not hidden/heads (24 and 8 against 64/4 = 16).
    "qwen3-gqa-tied-head-dim": ("qwen3", {"tie_word_embeddings": True, "head_dim": 24}),
    "qwen3-mha-untied-head-dim": ("qwen3", {"num_key_value_heads": 4, "head_dim": 8}),
    # Qwen's optional window, on the layers from max_window_layers on.
    "qwen3-window-upper-layers": ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1,
                                            "num_hidden_layers": 3}),
    # Phi-3: q/k/v and gate/up stored fused; Phi-4-mini rotates 3/4 of each head.
    "phi3-gqa-partial-rotary-window": ("phi3", {"partial_rotary_factor": 0.75, "sliding_window": 5}),
    "phi3-mha-full-rotary-tied": ("phi3", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    # OLMo 2: norms after attention and MLP, q/k norms over the whole projection.
    "olmo2-gqa-untied": ("olmo2", {}),
    "olmo2-mha-tied": ("olmo2", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    # Gemma: embeddings scaled by sqrt(hidden), RMSNorm by (1 + w), GeGLU, a wide head_dim.
    "gemma-mqa-tied": ("gemma", {"num_key_value_heads": 1, "tie_word_embeddings": True, "head_dim": 32}),
    "gemma-mha-untied": ("gemma", {"num_key_value_heads": 4, "head_dim": 16}),
    # Gemma 2: soft-capped attention and logits, query_pre_attn_scalar, four norms a layer,
    # and a sliding window of 4 on every other layer, which every prompt and continuation
    # here is longer than. Eager attention: transformers' SDPA path drops the soft-cap.
    "gemma2-gqa-window": ("gemma2", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 24,
                                     "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                                     "attn_implementation": "eager", "num_hidden_layers": 3}),
    # Gemma 3: q/k norms, and a window of 4 with its own rope base on the sliding layers.
    "gemma3-window-local-rope": ("gemma3_text", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                                                 "num_hidden_layers": 3, "attn_implementation": "eager",
                                                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory, tokenizer):
    kind, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    ref = build_llama(path, kind, tokenizer=tokenizer, **overrides)
    return ref, load_checkpoint(path, device="cpu")


def test_logits_match(pair):
    ref, ckpt = pair
    assert_logits_match(ref, ckpt, PROMPTS)


def test_greedy_continuations_match(pair):
    ref, ckpt = pair
    eos = ckpt.eos_token_ids
    gen = GenerationConfig(max_new_tokens=24, eos_token_ids=eos, sampling=SamplingConfig(temperature=0))
    for prompt in PROMPTS:
        ids = ckpt.encode(prompt)
        ours = generate(ckpt.model, ids, gen, ckpt.decode)[0].token_ids
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
        assert ours == theirs[0, len(ids) : len(ids) + len(ours)].tolist(), prompt


def test_cache_beam_and_batch_work_unchanged(pair):
    _, ckpt = pair
    model = ckpt.model
    ids = ckpt.encode("The quick brown fox jumps")
    with torch.no_grad():
        full = model(torch.tensor([ids]))
        cache = model.new_cache(1, len(ids))
        steps = torch.cat([model(torch.tensor([[t]]), None, cache) for t in ids], dim=1)
    assert torch.allclose(steps, full, atol=1e-4)
    greedy = GenerationConfig(max_new_tokens=8, ignore_eos=True, sampling=SamplingConfig(temperature=0))
    alone = [generate(model, ckpt.encode(p), greedy, ckpt.decode)[0].token_ids for p in PROMPTS]
    batched = generate_batch(model, [Row(ckpt.encode(p), None, 8) for p in PROMPTS], greedy, ckpt.decode)
    assert [s.token_ids for s in batched] == alone
    beam = beam_search(model, ckpt.encode(PROMPTS[0]), BeamConfig(width=1, max_new_tokens=8))
    assert beam.hypotheses[0].token_ids == alone[0]


def test_unsupported_rope_scaling_is_named(tmp_path, tokenizer):
    import json

    from llmgen.errors import ModelError

    build_llama(tmp_path, "llama", tokenizer=tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="yarn"):
        load_checkpoint(tmp_path, device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"),
        (lambda t: t.pop("model.layers.0.mlp.gate_proj.weight"), r"missing tensor 'model\.layers\.0\.mlp\.gate_proj\.weight'"),
        (lambda t: t.update({"model.layers.0.self_attn.v_proj.weight": torch.zeros(5, 64)}),
         r"'model\.layers\.0\.self_attn\.v_proj\.weight' has shape \[5, 64\], config\.json implies \[32, 64\]"),
        (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 63)}),
         r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[96, 63\], config\.json implies \[96, 64\]"),
    ],
)
def test_stacked_projection_errors_name_the_checkpoint_tensor(tmp_path, tokenizer, edit, message):
    """q/k/v and gate/up are stacked on load; a missing or misshapen part is still named as stored."""
    from safetensors.torch import load_file, save_file

    from llmgen.errors import ModelError

    build_llama(tmp_path, "llama", tokenizer=tokenizer)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=message):
        load_checkpoint(tmp_path, device="cpu")


def test_qwen_window_layers_without_layer_types(tmp_path, tokenizer):
    """Configs written before ``layer_types`` give the window's layers as max_window_layers."""
    import json

    build_llama(tmp_path, "qwen2", tokenizer=tokenizer, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    new = load_checkpoint(tmp_path, device="cpu").model.cfg
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    old = load_checkpoint(tmp_path, device="cpu").model.cfg
    assert old.sliding_layers == new.sliding_layers == (1,) and old.sliding_window == 4


@pytest.mark.parametrize(("key", "value", "named"), [
    ("hidden_activation", "relu2", "'relu2'"),
    ("layer_types", ["chunked_attention", "full_attention"], "'chunked_attention'"),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}, "'dynamic'"),
])
def test_unknown_feature_is_refused_by_name(tmp_path, tokenizer, capsys, key, value, named):
    """A config asking for something llmgen does not implement is an error naming it
    (exit 1), never a model quietly computing something else."""
    import json

    from llmgen.cli import main

    build_llama(tmp_path, "gemma3_text", tokenizer=tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None) if key == "rope_scaling" else None
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["run", "Hi", "--model", str(tmp_path), "-n", "1"]) == 1
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1


def test_phi3_longrope_is_refused_by_name(tmp_path, tokenizer):
    import json

    from llmgen.errors import ModelError

    build_llama(tmp_path, "phi3", tokenizer=tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'longrope'"):
        load_checkpoint(tmp_path, device="cpu")


def test_info_names_the_family_and_its_features(tmp_path, tokenizer):
    from llmgen.checkpoint import describe

    build_llama(tmp_path, "gemma2", tokenizer=tokenizer, **CASES["gemma2-gqa-window"][1])
    facts = describe(load_checkpoint(tmp_path, device="cpu"))
    assert facts["family"] == "Gemma 2"
    for feature in ("sliding window 4 on 2 of 3 layers", "attention soft-cap 5", "logit soft-cap 3", "grouped-query attention (4 q / 2 kv heads)"):
        assert feature in facts["features"]


def test_gemma3_configs_of_either_age(tmp_path, tokenizer):
    """Hub configs from before rope_parameters and layer_types (rope_theta,
    rope_local_base_freq, sliding_window_pattern) load the same model."""
    import json
    import shutil

    build_llama(tmp_path / "new", "gemma3_text", tokenizer=tokenizer, **CASES["gemma3-window-local-rope"][1])
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    del cfg["layer_types"]
    cfg.update(rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
               sliding_window_pattern=2)
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    new, old = load_checkpoint(tmp_path / "new", device="cpu"), load_checkpoint(tmp_path / "old", device="cpu")
    assert old.model.cfg.sliding_layers == new.model.cfg.sliding_layers == (0, 2)
    ids = torch.tensor([new.encode(PROMPTS[1] * 3)])
    assert torch.equal(old.model(ids), new.model(ids))
