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
    """The tokenizer and the token list of a file (``fields``: a ``metadata.Fields``)."""
    kind = fields.text("tokenizer.ggml.model")
    tokens = fields.tokens()
    if kind == "gpt2":
        return _byte_level_bpe(fields, tokens), tokens
    if kind == "llama":
        return _sentencepiece_bpe(fields, tokens), tokens
    raise ModelError(f"{fields.path}: GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama)")


def _merges(fields) -> list[tuple[str, str]]:
    key = "tokenizer.ggml.merges"
    merges = [tuple(m.split(" ", 1)) for m in fields.array(key, (str,), default=[])]
    bad = next((i for i, m in enumerate(merges) if len(m) != 2 or not all(m)), None)
    if bad is not None:
        raise fields.error(key, f"entry {bad} is {' '.join(merges[bad])!r}; a merge is two tokens separated by a space")
    return merges


def _bpe(fields, vocab: dict, merges: list, **options):
    """The BPE model; the merges must be pairs of tokens of the vocabulary."""
    from tokenizers import models

    try:
        return models.BPE(vocab, merges, **options)
    except Exception as e:  # tokenizers raises a bare Exception naming the token
        raise fields.error("tokenizer.ggml.merges", f"does not fit the token list ({str(e).splitlines()[0]})") from None


def _scores(fields, tokens: list[str]) -> list[float]:
    key = "tokenizer.ggml.scores"
    scores = fields.array(key, (int, float), default=None)
    if scores is None:
        return [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise fields.error(key, f"has {len(scores)} entries for the {len(tokens)} tokens of tokenizer.ggml.tokens")
    return [float(s) for s in scores]


def _byte_level_bpe(fields, tokens):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # bytes -> GPT-2's printable letters
    vocab = {}
    for index, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        vocab.setdefault(spelled, index)
    tok = Tokenizer(_bpe(fields, vocab, _merges(fields)))
    split = SPLITS.get(fields.text("tokenizer.ggml.pre", None))
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
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors

    family, stored = fields.arch, tokens  # as the file spells them: what its token types refer to
    if family in GEMMAS:
        # Gemma stores a token of several spaces with real spaces, and its scores do not
        # follow its merge order: the file's order does.
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = _scores(fields, tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = fields.token_id("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(_bpe(fields, vocab, merges_from_scores(tokens, ranks), fuse_unk=True, byte_fallback=True,
                         unk_token=tokens[unk] if unk is not None else None))
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
    bos = fields.token_id("tokenizer.ggml.bos_token_id")
    if bos is not None and fields.flag("tokenizer.ggml.add_bos_token", True):
        bos_token = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos)]
        )
    return tok


def _add_marked_tokens(tok, fields, tokens, spelled_right) -> None:
    """Tokens the file marks as control (``<|im_end|>``) become special tokens and those
    marked user-defined (``<think>``) plain added ones, so both are matched whole in text
    instead of cut into pieces, as llama.cpp and transformers do."""
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    types = fields.array("tokenizer.ggml.token_type", (int,), default=[])
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
