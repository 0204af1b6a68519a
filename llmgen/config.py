"""What the user asked for: every generation setting, its range, and how sources layer.

Each setting is declared once, in ``SETTINGS``: its default, the rule its value must
satisfy, and its help. Everything else derives from that table: the ``SamplingConfig``
fields are checked against it, the CLI builds its flags from it (``--top-p`` for
``top_p``), and a batch record accepts its names as keys. A bad value raises
``SettingError`` naming the *field*; the CLI reports it as the flag, batch as the
record's key and line, so no caller rewrites another's wording.

Sources layer in one place, ``layer``: a batch record's field > the flag > the model's
``generation_config.json`` > llmgen's default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from llmgen.errors import UsageError


class SettingError(UsageError):
    """A setting's value is out of its range. ``str()`` words it as the flag; ``in_record``
    words it as a batch record's key."""

    def __init__(self, name: str, problem: str) -> None:
        self.name, self.problem = name, problem
        super().__init__(f"{flag_name(name)} {problem}")

    def in_record(self) -> str:
        return f"{self.name} {self.problem}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def require(ok: bool, message: str) -> None:
    """Raise the usage error ``message`` unless ``ok`` (for options that are not settings)."""
    if not ok:
        raise UsageError(message)


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: a ``SamplingConfig``/``GenerationConfig`` field, a flag and a record key."""

    name: str
    kind: type  # int, float or str; ``many`` settings hold a tuple of them
    default: Any
    rule: str  # how the range reads in an error: "must be in (0, 1]"
    ok: Callable[[Any], bool]
    help: str
    many: bool = False  # a repeatable flag / a JSON list
    short: str | None = None


def _unit(low_open: bool, high_open: bool) -> Callable[[float], bool]:
    return lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)


# The order here is the order of the help and of the README's table.
SETTINGS: tuple[Setting, ...] = (
    Setting("max_new_tokens", int, 50, "must be >= 1", lambda v: v >= 1, "Most tokens to generate.", short="-n"),
    Setting("temperature", float, 1.0, "must be >= 0", lambda v: v >= 0, "Softmax temperature; 0 = greedy.", short="-t"),
    Setting("top_k", int, 0, "must be >= 0 (0 = off)", lambda v: v >= 0, "Keep the k most probable tokens; 0 = off.", short="-k"),
    Setting("top_p", float, 1.0, "must be in (0, 1]", _unit(True, False), "Nucleus: smallest set with mass >= p; 1 = off.", short="-p"),
    Setting("min_p", float, 0.0, "must be in [0, 1]", _unit(False, False), "Drop tokens below min_p x the top probability; 0 = off."),
    Setting("repetition_penalty", float, 1.0, "must be > 0", lambda v: v > 0, "> 1 discourages tokens already present; 1 = off."),
)

BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def check(name: str, value: Any) -> None:
    """Raise ``SettingError`` unless ``value`` is allowed for setting ``name``."""
    setting = BY_NAME[name]
    values = value if setting.many else (value,)
    for v in values:
        if setting.kind is float and isinstance(v, float) and math.isnan(v):
            raise SettingError(name, "must be a number, got nan")
        if not setting.ok(v):
            raise SettingError(name, f"{setting.rule}, got {v!r}" if setting.kind is str else f"{setting.rule}, got {v:g}")


def check_given(values: dict[str, Any]) -> None:
    """Check the settings that were given (not None): what flags can be checked before a model loads."""
    for name, value in values.items():
        if value is not None and name in BY_NAME:
            check(name, value)


def layer(*sources: dict[str, Any] | None) -> dict[str, Any]:
    """Every setting from the first source that gives it (not None), else llmgen's default.

    Callers pass sources strongest first: record, flags, the model's generation_config."""
    out = {}
    for name, default in DEFAULTS.items():
        out[name] = next((s[name] for s in sources if s and s.get(name) is not None), default)
    return out


@dataclass(frozen=True)
class SamplingConfig:
    """How one next token is chosen from the model's logits (see ``llmgen.sampling``).

    ``temperature == 0`` (or ``top_k == 1``) is greedy; each other field's neutral value
    switches its stage off. Every field is checked against ``SETTINGS`` on construction.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f.name, getattr(self, f.name))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> SamplingConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


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
        check("max_new_tokens", self.max_new_tokens)
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(all(self.stop), "--stop strings must not be empty")
        check_seed(self.seed)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return () if self.ignore_eos else self.eos_token_ids


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise SettingError("seed", f"must be in [0, 2**63), got {seed}")


def from_json(name: str, value: Any) -> Any:
    """A batch record's JSON value for setting ``name``: type-checked, lists as tuples."""
    setting = BY_NAME[name]
    if setting.many and not isinstance(value, list):
        raise SettingError(name, "must be a list")
    items = value if setting.many else [value]
    for v in items:
        if setting.kind is str:
            ok = isinstance(v, str)
        else:
            allowed = int if setting.kind is int else (int, float)
            ok = isinstance(v, allowed) and not isinstance(v, bool)
        if not ok:
            raise SettingError(name, "must be a string" if setting.kind is str else "must be a number" + (" (integer)" if setting.kind is int else ""))
    if setting.many:
        return tuple(items)
    return float(value) if setting.kind is float else value
