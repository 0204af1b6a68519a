"""llmgen: generate text from decoder-only language models and see how it was chosen."""

__version__ = "0.1.0"
