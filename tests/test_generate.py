"""The decode loop: seeds, stopping conditions, and the numbers it reports."""

import torch

from llmgen.config import GenerationConfig, SamplingConfig
from llmgen.decoding.greedy_sample import generate


def run(ckpt, prompt="I like", **kwargs):
    sampling = SamplingConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in SamplingConfig.__dataclass_fields__})
    kwargs.setdefault("eos_token_ids", ckpt.eos_token_ids)
    gen = GenerationConfig(sampling=sampling, **kwargs)
    return generate(ckpt.model, ckpt.encode(prompt), gen, ckpt.decode)


def test_same_seed_same_text_different_seed_different_text(ckpt):
    a = run(ckpt, seed=11, max_new_tokens=20, ignore_eos=True)[0]
    b = run(ckpt, seed=11, max_new_tokens=20, ignore_eos=True)[0]
    c = run(ckpt, seed=12, max_new_tokens=20, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_sample_i_is_reproducible_alone_with_seed_plus_i(ckpt):
    many = run(ckpt, seed=100, num_samples=3, max_new_tokens=15, ignore_eos=True)
    assert [s.seed for s in many] == [100, 101, 102]
    alone = run(ckpt, seed=102, max_new_tokens=15, ignore_eos=True)[0]
    assert alone.token_ids == many[2].token_ids


def test_top_k_1_equals_greedy(ckpt):
    greedy = run(ckpt, temperature=0, max_new_tokens=20, ignore_eos=True)[0]
    top1 = run(ckpt, temperature=1.5, top_k=1, seed=3, max_new_tokens=20, ignore_eos=True)[0]
    assert greedy.token_ids == top1.token_ids
    assert greedy.seed is None


def test_logprobs_are_under_the_unmodified_distribution(ckpt):
    prompt_ids = ckpt.encode("I like")
    sample = run(ckpt, temperature=0.5, top_k=5, seed=1, max_new_tokens=10, ignore_eos=True)[0]
    ids = torch.tensor([prompt_ids + sample.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(ckpt.model(ids)[0].float(), -1)
    expected = [logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(sample.token_ids)]
    assert torch.allclose(torch.tensor(sample.logprobs), torch.tensor(expected), atol=1e-4)


def test_eos_stops_and_is_reported(ckpt):
    """Make the EOS token the greedy choice at some step by declaring that step's token EOS."""
    free = run(ckpt, temperature=0, max_new_tokens=10, ignore_eos=True)[0]
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    out = run(ckpt, temperature=0, max_new_tokens=10, eos_token_ids=(eos,))[0]
    assert out.finish_reason == "eos"
    assert out.token_ids == free.token_ids[: first + 1]  # EOS included in token_ids
    ignored = run(ckpt, temperature=0, max_new_tokens=10, eos_token_ids=(eos,), ignore_eos=True)[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 10


def test_stop_string_cuts_the_text(ckpt):
    free = run(ckpt, temperature=0, max_new_tokens=20, ignore_eos=True)[0]
    stop = free.text[5:8]
    assert stop and stop in free.text
    out = run(ckpt, temperature=0, max_new_tokens=20, ignore_eos=True, stop=(stop,))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    assert stop not in out.text


def test_length_and_context_limit(ckpt):
    out = run(ckpt, temperature=0, max_new_tokens=7, ignore_eos=True)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    context = ckpt.model.cfg.context_length
    prompt_len = len(ckpt.encode("I like"))
    out = run(ckpt, temperature=0, max_new_tokens=10_000, ignore_eos=True)[0]
    assert len(out.token_ids) == context - prompt_len and out.finish_reason == "context"


def test_streamed_text_equals_final_text(ckpt):
    pieces = []
    gen = GenerationConfig(max_new_tokens=30, seed=5, ignore_eos=True, stop=("zz",))
    sample = generate(ckpt.model, ckpt.encode("naïve café"), gen, ckpt.decode, on_token=lambda r, t, lp, h, d: pieces.append(d))[0]
    assert "".join(pieces) == sample.text


def test_trace_records_alternatives(ckpt):
    gen = GenerationConfig(max_new_tokens=5, sampling=SamplingConfig(temperature=0), ignore_eos=True)
    sample = generate(ckpt.model, ckpt.encode("I like"), gen, ckpt.decode, trace_top=3)[0]
    assert len(sample.steps) == 5
    for step in sample.steps:
        assert len(step.alternatives) == 3
        assert step.alternatives[0].token_id == step.token_id  # greedy picks the best
