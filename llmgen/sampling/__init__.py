"""The sampler chain: logits -> stages in a documented order -> one token per row.

See ``chain.py`` for the order and how a chain is built, ``stage.py`` for the stage
interface; each other module holds one family of stages.
"""

from llmgen.sampling.chain import DEFAULT_ORDER, Explanation, Sampler, build_sampler

__all__ = ["DEFAULT_ORDER", "Explanation", "Sampler", "build_sampler"]
