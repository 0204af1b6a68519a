"""What the user asked for, validated once, before any model is loaded.

Range checks live here rather than in the CLI so that every entry point (flags,
batch records, tests) rejects the same values with the same message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmgen.errors import UsageError


def require(ok: bool, message: str) -> None:
    """Raise the usage error ``message`` unless ``ok``."""
    if not ok:
        raise UsageError(message)


@dataclass(frozen=True)
class SamplingConfig:
    """How one next token is chosen from the model's logits.

    ``temperature == 0`` means greedy (argmax). ``top_k == 0``, ``top_p == 1`` and
    ``min_p == 0`` switch those filters off; ``repetition_penalty == 1`` is no penalty.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        require(self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}")
        require(self.temperature == self.temperature, "--temperature must be a number")
        require(self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        require(0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}")
        require(0 <= self.min_p <= 1, f"--min-p must be in [0, 1], got {self.min_p}")
        require(self.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class GenerationConfig:
    """When generation stops, and how many continuations to produce."""

    max_new_tokens: int = 50
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    eos_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(all(self.stop), "--stop strings must not be empty")
        require(self.seed is None or 0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return () if self.ignore_eos else self.eos_token_ids


# llmgen's own defaults, used for a flag the user did not give and the model's
# generation_config.json does not set. Plain ancestral sampling: the model's own
# distribution, unfiltered, so what you see is what the model says.
DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 50,
}


def resolve(flags: dict[str, Any], model_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each setting from the flag if given, else the model's generation_config, else ours."""
    model_defaults = model_defaults or {}
    return {
        key: flags[key] if flags.get(key) is not None else model_defaults.get(key, default)
        for key, default in DEFAULTS.items()
    }


def sampling_from(values: dict[str, Any]) -> SamplingConfig:
    names = SamplingConfig.__dataclass_fields__
    return SamplingConfig(**{k: v for k, v in values.items() if k in names})
