"""What each weight format costs in quality: llmgen's and llama.cpp's, on the same text.

    python bench/quality.py [--text FILE] [--tokens 1024]

SmolLM2-135M-Instruct (see ``bench/llamacpp.py``: the GGUF ``llmgen pull smollm2``
fetches, requantized by llama.cpp to F32, Q8_0 and Q4_0). Every model reads the same
token ids in one pass, and each position's next-token distribution is compared with
float32's: KL(float32 || format) per token (mean, 99th percentile), how often the most
probable token is the same, and the text's perplexity. llmgen's formats are compared
with llmgen float32 and llama.cpp's with llama.cpp F32, so each engine is judged
against itself; the two float32s are compared with each other too.

The default text is the first 8,000 characters of Python's own reference topics
(``pydoc_data``): English prose any machine with Python has, so the numbers can be
reproduced without a download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def default_text() -> str:
    import pydoc_data.topics as topics

    return (topics.topics["assignment"] + "\n" + topics.topics["atom-identifiers"])[:8000]


def compare(reference: torch.Tensor, logits: torch.Tensor, ids: list[int]) -> dict:
    """KL(reference || logits) per position, top-1 agreement and perplexity of ``ids``."""
    ref, got = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    nll = -got[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)),
            "same_top": float((ref.argmax(-1) == got.argmax(-1)).double().mean()), "perplexity": float(nll.mean().exp())}


def llmgen_logits(path: Path, dtype: str, ids: list[int]) -> torch.Tensor:
    from llmgen.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, device="cpu", dtype=dtype)
    with torch.inference_mode():
        return ckpt.model(torch.tensor([ids]))[0].float()


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True, verbose=False)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", help="a text file (default: see above)")
    ap.add_argument("--tokens", type=int, default=1024, help="score at most this many tokens")
    args = ap.parse_args()
    from llamacpp import LLAMA_CPP_FORMATS, have_llama_cpp, kept, requantize, smollm2

    model_dir, gguf_path = smollm2()
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_text()
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids[: args.tokens]
    rows = {}
    ours = llmgen_logits(model_dir, "float32", ids)
    for label, path, dtype in [("int8 (rounded at load)", model_dir, "int8"), ("int4 (Q4_0 rounded at load)", model_dir, "int4")]:
        rows[f"llmgen {label}"] = compare(ours, llmgen_logits(path, dtype, ids), ids)
    if have_llama_cpp():
        files = {fmt: requantize(gguf_path, fmt, gguf_path.parent / f"bench.{fmt}.gguf") for fmt in LLAMA_CPP_FORMATS}
        for fmt in ("Q8_0", "Q4_0"):
            rows[f"llmgen {fmt} kept"] = compare(ours, llmgen_logits(kept(files[fmt]), "auto", ids), ids)
        theirs = llama_cpp_logits(files["F32"], ids)
        rows["llama.cpp F32 (against llmgen float32)"] = compare(ours, theirs, ids)
        for fmt in ("Q8_0", "Q4_0"):
            rows[f"llama.cpp {fmt}"] = compare(theirs, llama_cpp_logits(files[fmt], ids), ids)
    else:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): llama.cpp is left out")
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens; llmgen float32 perplexity {compare(ours, ours, ids)['perplexity']:.3f}")
    print(f"{'':42} {'KL mean':>9} {'KL p99':>9} {'same top':>9} {'perplexity':>11}")
    for label, r in rows.items():
        print(f"{label:42} {r['kl_mean']:9.4f} {r['kl_p99']:9.4f} {r['same_top']:9.3f} {r['perplexity']:11.3f}")


if __name__ == "__main__":
    main()
