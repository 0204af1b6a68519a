"""The sampler chain: logits -> stages in a documented order -> one token per row.

See ``chain.py`` for the order and how a chain is built, ``stage.py`` for the stage
interface; each other module holds one family of stages.
"""

from llmgen.sampling.chain import CONSTRAINTS, Explanation, Sampler, build_sampler
from llmgen.sampling.tokens import TokenRules, Vocabulary, resolve_tokens

__all__ = ["CONSTRAINTS", "Explanation", "Sampler", "TokenRules", "Vocabulary", "build_sampler", "resolve_tokens"]
