"""How llmgen chose its constraint library: llguidance against xgrammar, on the embedded
model's GPT-2-style vocabulary (8,000 tokens) and SmolLM2's (49,152; when pulled).

    pip install llguidance xgrammar    # xgrammar only for this comparison (it needs transformers)
    python bench/constrain_libraries.py [--repeats 30]

For each library and vocabulary: the time to build its view of the vocabulary, to
compile a JSON schema and a regex, and the time of one token mask, walking each
constraint through a text that satisfies it (mean, median and worst step over every
step of every repeat). A library that is not installed is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmgen.checkpoint import embedded_dir  # noqa: E402
from llmgen.models_cache import is_pulled, model_path  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "city"], "additionalProperties": False}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
TEXTS = {"schema": '{"name": "Ada Lovelace", "city": "London", "age": 36}', "regex": "2024-01-31"}


def walk(step, consume, reset, ids: list[int], repeats: int) -> list[float]:
    """Seconds of each mask, over ``repeats`` walks through ``ids``."""
    times = []
    for _ in range(repeats):
        reset()
        for token in ids:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            assert consume(token), token
    return times


def llguidance_row(path: Path, eos: int, tok, repeats: int) -> dict:
    import llguidance
    import llguidance.torch as lt

    start = time.perf_counter()
    adapter = llguidance.LLTokenizer(tok.to_str(), eos_token=eos)
    out = {"vocabulary s": time.perf_counter() - start}
    for kind, grammar in (("schema", llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)),
                          ("regex", llguidance.LLMatcher.grammar_from_regex(REGEX))):
        start = time.perf_counter()
        m = llguidance.LLMatcher(adapter, grammar)
        out[f"{kind} compile s"] = time.perf_counter() - start
        mask = lt.allocate_token_bitmask(1, adapter.vocab_size)
        out[kind] = walk(lambda: lt.fill_next_token_bitmask(m, mask, 0), m.consume_token, m.reset,
                         tok.encode(TEXTS[kind]).ids, repeats)
    return out


def xgrammar_row(path: Path, eos: int, tok, repeats: int) -> dict:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_file=str(path)), stop_token_ids=[eos],
                                              vocab_size=tok.get_vocab_size())
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    out = {"vocabulary s": time.perf_counter() - start}
    for kind in ("schema", "regex"):
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA)) if kind == "schema" else compiler.compile_regex(REGEX)
        out[f"{kind} compile s"] = time.perf_counter() - start
        m = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, info.vocab_size)
        out[kind] = walk(lambda: m.fill_next_token_bitmask(mask, 0), m.accept_token, m.reset, tok.encode(TEXTS[kind]).ids, repeats)
    return out


def main() -> None:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    vocabularies = {"embedded": embedded_dir()} | ({"smollm2": model_path("smollm2")} if is_pulled("smollm2") else {})
    print(f"{'vocabulary':<10} {'library':<11} {'build s':>8} {'compile ms':>11} "
          f"{'schema mask µs mean/median/max':>31} {'regex mask µs mean/median/max':>30}")
    for name, directory in vocabularies.items():
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        eos = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
        eos = eos[0] if isinstance(eos, list) else eos
        for library, row in (("llguidance", llguidance_row), ("xgrammar", xgrammar_row)):
            try:
                r = row(directory / "tokenizer.json", eos, tok, args.repeats)
            except ImportError:
                print(f"{name:<10} {library:<11} not installed")
                continue
            masks = ["/".join(f"{v * 1e6:.1f}" for v in (statistics.mean(r[k]), statistics.median(r[k]), max(r[k])))
                     for k in ("schema", "regex")]
            compile_ms = f"{r['schema compile s'] * 1e3:.1f}/{r['regex compile s'] * 1e3:.1f}"
            print(f"{name:<10} {library:<11} {r['vocabulary s']:>8.3f} {compile_ms:>11} {masks[0]:>31} {masks[1]:>30}")


if __name__ == "__main__":
    main()
