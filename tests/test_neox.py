"""GPT-NeoX (Pythia) on the Llama module, against transformers' GPTNeoXForCausalLM."""

import json

import pytest
import torch

from checkpoints import assert_logits_match, build_neox
from llmgen.checkpoint import load_checkpoint
from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.greedy_sample import Row, generate, generate_batch
from llmgen.errors import ModelError

PROMPTS = ["I like", "The quick brown fox", "naïve café 日本"]
CASES = {
    "pythia-parallel-quarter-rotary": {},
    "serial-residual-full-rotary": {"use_parallel_residual": False, "rotary_pct": 1.0},
    "parallel-half-rotary-tied": {"rotary_pct": 0.5, "tie_word_embeddings": True},
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp(request.param)
    ref = build_neox(path, tokenizer=tokenizer, **CASES[request.param])
    return ref, load_checkpoint(path, device="cpu"), path


def test_logits_match(pair):
    ref, ckpt, _ = pair
    assert_logits_match(ref, ckpt, PROMPTS)


def test_greedy_cache_and_batch(pair):
    ref, ckpt, _ = pair
    eos = ckpt.eos_token_ids
    gen = GenerationConfig(max_new_tokens=20, eos_token_ids=eos, sampling=SamplingConfig(temperature=0))
    alone = []
    for prompt in PROMPTS:
        ids = ckpt.encode(prompt)
        ours = generate(ckpt.model, ids, gen, ckpt.decode)[0].token_ids
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
        assert ours == theirs[0, len(ids) : len(ids) + len(ours)].tolist(), prompt
        alone.append(ours)
    batched = generate_batch(ckpt.model, [Row(ckpt.encode(p), None, 20) for p in PROMPTS], gen, ckpt.decode)
    assert [s.token_ids for s in batched] == alone


def test_pythias_own_config_keys(pair, tmp_path):
    """Pythia's config.json predates rope_parameters: rotary_pct and rotary_emb_base."""
    ref, ckpt, path = pair
    import shutil

    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([ckpt.encode(PROMPTS[1])])
    assert torch.equal(load_checkpoint(tmp_path / "m", device="cpu").model(ids), ckpt.model(ids))


def test_unsupported_rope_scaling_is_refused_by_name(pair, tmp_path):
    _, _, path = pair
    import shutil

    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'dynamic'"):
        load_checkpoint(tmp_path / "m", device="cpu")
