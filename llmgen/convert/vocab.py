"""A ``tokenizers`` tokenizer rebuilt from a GGUF vocabulary, as transformers rebuilds it.

A GGUF carries no ``tokenizer.json``: only the tokens, their scores and types, the
merges (byte-level files) and a few flags. Three shapes are in use:
- byte-level BPE (``gpt2``: GPT-2, Llama 3, Qwen, SmolLM), with the pre-tokenizer split
  named by ``tokenizer.ggml.pre``;
- SentencePiece BPE (``llama``), whose merges must be recovered from the scores:
  Llama 2, TinyLlama and Mistral prefix the text with "▁" through Metaspace; Phi-3 through
  a normalizer; Gemma not at all, and its merges rank by file order, not score.
"""

from __future__ import annotations

from llmgen.errors import ModelError

# Pre-tokenizer splits by tokenizer.ggml.pre, where a vocabulary was learned with one
# other than GPT-2's (the same table transformers uses).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
SPACE = "\u2581"
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
GEMMAS = ("gemma", "gemma2", "gemma3")


def gguf_tokenizer(fields):
    """The tokenizer and the token list of a file (``fields``: an ``architectures.Fields``)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if kind == "gpt2":
        return _byte_level_bpe(fields, tokens), tokens
    if kind == "llama":
        return _sentencepiece_bpe(fields, tokens), tokens
    raise ModelError(f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama)")


def _byte_level_bpe(fields, tokens):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes -> GPT-2's printable letters
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        vocab.setdefault(spelled, index)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges))
    split = SPLITS.get(fields.get("tokenizer.ggml.pre"))
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel: adding
    # it would grow the vocabulary past the model's.
    _add_marked_tokens(tok, fields, tokens, lambda t: set(t) <= alphabet)
    return tok


def _sentencepiece_bpe(fields, tokens):
    """SentencePiece's BPE: "▁" stands for a space, bytes missing from the vocabulary
    fall back to ``<0xNN>`` tokens, BOS is added unless the file says not to, and the
    merges (which the file does not store) are recovered from the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    family, stored = fields.arch, tokens  # as the file spells them: what its token types refer to
    if family in GEMMAS:
        # Gemma stores a token of several spaces with real spaces, and its scores do not
        # follow its merge order: the file's order does.
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab, merges_from_scores(tokens, ranks), fuse_unk=True, byte_fallback=True,
                               unk_token=tokens[int(unk)] if unk is not None else None))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if family in GEMMAS:  # no prefix space; spaces respelled by a normalizer
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif family == "phi3":  # the prefix space comes from a normalizer, so "  hi" keeps all its spaces
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    _add_marked_tokens(tok, fields, stored, lambda t: True)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if bos is not None and fields.get("tokenizer.ggml.add_bos_token", True):
        bos_token = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, int(bos))]
        )
    return tok


def _add_marked_tokens(tok, fields, tokens, spelled_right) -> None:
    """Tokens the file marks as control (``<|im_end|>``) become special tokens and those
    marked user-defined (``<think>``) plain added ones, so both are matched whole in text
    instead of cut into pieces, as llama.cpp and transformers do."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    types = fields.get("tokenizer.ggml.token_type") or []
    marked = [(t, ty) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED) and t in vocab and spelled_right(t)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in marked if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in marked if ty == USER_DEFINED])


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every way to split a token into
    two tokens of the vocabulary is a merge, ranked by the merged token's score (best
    first), then by the longer left piece, then the longer right one; ties keep
    vocabulary order. This is the order transformers derives, so both tokenize alike."""
    vocab = {token: index for index, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found += [(left, right, score) for left, right in splits]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]
