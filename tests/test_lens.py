"""The logit lens: every layer's residual stream read through the final norm and head.
Its last row is the model's own distribution; its other rows are transformers' hidden
states put through the same head."""

import json

import pytest
import torch

from checkpoints import build_llama, build_neox
from llmgen.checkpoint import load_checkpoint
from llmgen.cli import main
from llmgen.lens import logit_lens


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, gpt2_dir):
    """(our checkpoint, transformers' model) for GPT-2, Llama and GPT-NeoX."""
    out = [(load_checkpoint(gpt2_dir[0], device="cpu", dtype="float32"), gpt2_dir[1])]
    for build in (build_llama, build_neox):
        path = tmp_path_factory.mktemp(build.__name__)
        ref = build(path, tokenizer=tokenizer)
        out.append((load_checkpoint(path, device="cpu", dtype="float32"), ref))
    return out


def test_the_last_row_is_the_models_own_distribution(models):
    for ckpt, _ in models:
        ids = ckpt.encode("I like cold coffee")
        lens = logit_lens(ckpt.model, ids, top=8)
        own = torch.log_softmax(ckpt.model(torch.tensor([ids]))[0, -1].float(), -1).topk(8)
        assert len(lens.rows) == ckpt.model.cfg.n_layer + 1
        assert [c.token_id for c in lens.rows[-1].top] == own.indices.tolist()
        assert [c.logprob for c in lens.rows[-1].top] == pytest.approx(own.values.tolist(), abs=1e-5)


def test_every_layer_equals_transformers_hidden_states_through_the_head(models):
    for ckpt, ref in models:
        ids = ckpt.encode("the quick brown fox")
        position = 2
        lens = logit_lens(ckpt.model, ids, position, top=5)
        with torch.no_grad():
            hidden = ref(torch.tensor([ids[: position + 1]]), output_hidden_states=True).hidden_states
        for row, h in zip(lens.rows[:-1], hidden[:-1]):  # transformers' last one already has the final norm
            expected = torch.log_softmax(ckpt.model.head(h[:, -1:].float())[0, 0].float(), -1).topk(5)
            assert [c.token_id for c in row.top] == expected.indices.tolist(), row.layer
            assert [c.logprob for c in row.top] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_lens_at_the_command_line(gpt2_dir, capsys):
    model = ["--model", str(gpt2_dir[0])]
    assert main(["lens", "I like cold coffee", *model, "--json", "--top", "3", "--position", "2"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["position"] == 1 and len(rec["layers"]) == 3 and all(len(layer["top"]) == 3 for layer in rec["layers"])
    assert main(["lens", "I like", *model]) == 0
    out = capsys.readouterr().out
    assert "logit lens at token" in out and "p(answer)" in out
    for bad in (["--position", "0"], ["--position", "99"], ["--top", "0"]):
        assert main(["lens", "I like", *model, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--" in err, err
