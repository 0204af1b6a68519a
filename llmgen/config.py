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
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
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
    setting = BY_NAME.get(name)
    return setting.flag if setting and setting.flag else "--" + name.replace("_", "-")


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
    flag: str | None = None  # when the flag is not --name-with-dashes


def _unit(low_open: bool, high_open: bool) -> Callable[[float], bool]:
    return lambda v: (0 < v if low_open else 0 <= v) and (v < 1 if high_open else v <= 1)


def _parses(parse: Callable[[str], Any]) -> Callable[[str], bool]:
    """A range rule for a text setting: ``parse`` accepts it (raises no ValueError)."""

    def ok(text: str) -> bool:
        try:
            parse(text)
        except ValueError:
            return False
        return True

    return ok


def parse_bias(spec: str) -> tuple[str, float]:
    """``TOKEN=BIAS`` -> (TOKEN, BIAS). BIAS is in [-100, 100] (as OpenAI's; 100 already
    all but forces a token, and more overflows float32 logits) or ``-inf`` (a ban)."""
    token, sep, bias = spec.rpartition("=")
    value = float(bias) if sep and token else math.nan
    if not (-100 <= value <= 100 or value == -math.inf):
        raise ValueError(spec)
    return token, value


def read_escapes(text: str) -> str:
    """``\\n``, ``\\t``, ``\\"`` and ``\\\\`` as typed on a command line, as llama.cpp reads them."""
    return re.sub(r"\\([nt\"\\])", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text)


# Sampler stages that --samplers can order, in the default order (transformers' order,
# with each llama.cpp-only stage placed next to the neighbour llama.cpp gives it), and
# the other names users know them by (llama.cpp's, transformers').
STAGES = ("penalties", "dry", "temperature", "top-n-sigma", "top-k", "top-p", "min-p", "xtc", "typical", "epsilon", "eta")
STAGE_ALIASES = {
    "temp": "temperature", "topk": "top-k", "topp": "top-p", "nucleus": "top-p", "minp": "min-p",
    "typ-p": "typical", "typp": "typical", "typ": "typical", "typical-p": "typical", "topnsigma": "top-n-sigma",
    "epsilon-cutoff": "epsilon", "eta-cutoff": "eta", "repetition": "penalties",
}


def parse_samplers(text: str) -> tuple[str, ...]:
    """``--samplers`` as a tuple of canonical stage names; separators ``,`` or ``;``,
    llama.cpp's ``_`` spellings and any case accepted."""
    names = []
    for raw in re.split(r"[,;]", text):
        name = raw.strip().lower().replace("_", "-")
        name = STAGE_ALIASES.get(name, name)
        if name not in STAGES:
            raise ValueError(f"unknown sampler {raw.strip()!r} (known: {', '.join(STAGES)})")
        if name in names:
            raise ValueError(f"{name} is named twice")
        names.append(name)
    return tuple(names)


# The order here is the order of the help and of the README's table.
SETTINGS: tuple[Setting, ...] = (
    Setting("max_new_tokens", int, 50, "must be >= 1", lambda v: v >= 1, "Most tokens to generate.", short="-n"),
    Setting("temperature", float, 1.0, "must be 0 (greedy) or at least 0.0001", lambda v: v == 0 or v >= 1e-4, "Softmax temperature; 0 = greedy.", short="-t"),
    Setting("top_k", int, 0, "must be >= 0 (0 = off)", lambda v: v >= 0, "Keep the k most probable tokens; 0 = off.", short="-k"),
    Setting("top_p", float, 1.0, "must be in (0, 1]", _unit(True, False), "Nucleus: smallest set with mass >= p; 1 = off.", short="-p"),
    Setting("min_p", float, 0.0, "must be in [0, 1]", _unit(False, False), "Drop tokens below min_p x the top probability; 0 = off."),
    Setting("typical_p", float, 1.0, "must be in (0, 1]", _unit(True, False), "Locally typical: keep tokens whose surprise is nearest the entropy, up to mass p; 1 = off."),
    Setting("epsilon_cutoff", float, 0.0, "must be in [0, 1)", _unit(False, True), "Drop tokens with probability below epsilon; 0 = off."),
    Setting("eta_cutoff", float, 0.0, "must be in [0, 1)", _unit(False, True), "Drop tokens below min(eta, sqrt(eta)·e^-entropy); 0 = off."),
    Setting("top_n_sigma", float, 0.0, "must be >= 0 (0 = off)", lambda v: v >= 0, "Keep tokens within n standard deviations of the top logit; 0 = off."),
    Setting("xtc_probability", float, 0.0, "must be in [0, 1]", _unit(False, False), "XTC: chance per step of removing the top choices; 0 = off."),
    Setting("xtc_threshold", float, 0.1, "must be in [0, 0.5] (above 0.5 no two tokens can pass it)", lambda v: 0 <= v <= 0.5, "XTC: tokens at or above this probability are the top choices."),
    Setting("dynatemp_range", float, 0.0, "must be >= 0", lambda v: v >= 0, "Dynamic temperature: T moves within T ± range with the entropy; 0 = off."),
    Setting("dynatemp_exponent", float, 1.0, "must be > 0", lambda v: v > 0, "Dynamic temperature: exponent on the normalised entropy."),
    Setting("repetition_penalty", float, 1.0, "must be in [0.001, 1000]", lambda v: 1e-3 <= v <= 1e3, "> 1 discourages tokens already present; 1 = off."),
    Setting("presence_penalty", float, 0.0, "must be in [-100, 100]", lambda v: -100 <= v <= 100, "Subtract this from the logit of every token present; 0 = off."),
    Setting("frequency_penalty", float, 0.0, "must be in [-100, 100]", lambda v: -100 <= v <= 100, "Subtract this times its count from each present token's logit; 0 = off."),
    Setting("repeat_last_n", int, -1, "must be >= -1", lambda v: v >= -1, "Window of the three penalties, in tokens; -1 = the whole text, 0 = penalties off."),
    Setting("dry_multiplier", float, 0.0, "must be >= 0", lambda v: v >= 0, "DRY: penalty scale for extending a repeat; 0 = off."),
    Setting("dry_base", float, 1.75, "must be >= 1", lambda v: v >= 1, "DRY: the penalty grows as base^(length - allowed length)."),
    Setting("dry_allowed_length", int, 2, "must be >= 0", lambda v: v >= 0, "DRY: repeats shorter than this are free."),
    Setting("dry_penalty_last_n", int, -1, "must be >= -1", lambda v: v >= -1, "DRY: how far back repeats are looked for; -1 = the whole text, 0 = off."),
    Setting("dry_sequence_breakers", str, ("\n", ":", '"', "*"), "must not be empty", bool,
            "DRY: a repeat never spans this text (repeatable; replaces the default \\n : \" *; 'none' for no breakers).",
            many=True, flag="--dry-sequence-breaker"),
    Setting("no_repeat_ngram_size", int, 0, "must be >= 0", lambda v: v >= 0, "Forbid repeating any n-gram of this size; 0 = off."),
    Setting("min_new_tokens", int, 0, "must be >= 0", lambda v: v >= 0, "No end-of-sequence token before this many new tokens."),
    Setting("bad_words", str, (), "must not be empty", bool, "Never generate this text (repeatable).", many=True),
    Setting("logit_bias", str, (), "must look like TOKEN=BIAS, BIAS in [-100, 100] or -inf", _parses(parse_bias),
            "TOKEN=BIAS: add BIAS to the logit of TOKEN (an id, or a text that is one token); -inf bans it. Repeatable.", many=True),
    Setting("mirostat", int, 0, "must be 0, 1 or 2", lambda v: v in (0, 1, 2), "Mirostat version (1 or 2), in place of the truncation stages; 0 = off."),
    Setting("mirostat_tau", float, 5.0, "must be > 0", lambda v: v > 0, "Mirostat: target surprise, in bits per token."),
    Setting("mirostat_eta", float, 0.1, "must be > 0", lambda v: v > 0, "Mirostat: learning rate of its running threshold."),
    Setting("samplers", str, None, "must be a list of sampler names", _parses(parse_samplers),
            f"Order of the sampler stages, e.g. penalties,dry,top-k,min-p,temperature (default: {','.join(STAGES)})."),
    # Constraints on the whole output (llmgen.constraint): at most one; checked by llguidance.
    Setting("json_schema", str, None, "must be a JSON Schema", bool,
            "Constrain the output to JSON that validates against this schema (a file, or the schema's JSON text).",
            flag="--json-schema"),
    Setting("format", str, None, "must be json", lambda v: v == "json",
            "json: constrain the output to a JSON object (any; --json-schema for a given shape)."),
    Setting("regex", str, None, "must be a regular expression", bool, "Constrain the output to match this regular expression (whole)."),
    Setting("choice", str, (), "must not be empty", bool, "Constrain the output to be exactly one of these texts (repeatable).", many=True),
    Setting("grammar", str, None, "must be a Lark grammar", bool,
            "Constrain the output to this Lark grammar (a file; llguidance's Lark dialect, with JSON Schema and regex inside)."),
)

BY_NAME = {s.name: s for s in SETTINGS}
# The settings that confine the whole output to a language (llmgen.constraint), in the order the help lists them.
CONSTRAINT_KINDS = ("json_schema", "format", "regex", "choice", "grammar")
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}


def check(name: str, value: Any) -> None:
    """Raise ``SettingError`` unless ``value`` is allowed for setting ``name``."""
    setting = BY_NAME[name]
    if value is None and setting.default is None:
        return
    if name in CONSTRAINT_KINDS and value != setting.default:  # llguidance says what is wrong
        from llmgen import constraint

        bad = [v for v in (value if setting.many else (value,)) if not setting.ok(v)]
        problem = f"{setting.rule}, got {bad[0]!r}" if bad else constraint.problem(name, value)
        if problem:
            raise SettingError(name, problem)
        return
    if name == "samplers":  # say which name is wrong
        try:
            parse_samplers(value)
        except ValueError as e:
            raise SettingError(name, f"has an {e}" if str(e).startswith("unknown") else f"names {e}") from None
    values = value if setting.many else (value,)
    for v in values:
        if setting.kind is float and isinstance(v, float) and not math.isfinite(v):
            raise SettingError(name, f"must be a finite number, got {v}")
        if not setting.ok(v):
            raise SettingError(name, f"{setting.rule}, got {v!r}" if setting.kind is str else f"{setting.rule}, got {v:g}")


def normalise(name: str, value: Any) -> Any:
    """A flag's value as the setting holds it: repeatable flags as tuples, escapes
    (``\\n``) in DRY's breakers read as llama.cpp reads them, ``none`` for no breakers,
    the files of ``--json-schema`` and ``--grammar`` read (``read_constraint``)."""
    if name in ("json_schema", "grammar"):
        return read_constraint(name, value)
    if value is None or not BY_NAME[name].many:
        return value
    values = tuple(value)
    if name == "dry_sequence_breakers":
        values = () if values == ("none",) else tuple(read_escapes(v) for v in values)
    return values


def parse_text(name: str, text: str) -> tuple[str, Any]:
    """A setting typed as words rather than flags (chat's ``/set``, explore's ``set``):
    its field name (dashes or underscores) and its value, parsed and checked as its flag
    would be. A repeatable setting takes the one value given."""
    key = name.replace("-", "_")
    if key not in BY_NAME:
        raise UsageError(f"no setting {name!r} (see llmgen run --help)")
    setting = BY_NAME[key]
    try:
        parsed = [text] if setting.many else setting.kind(text)
    except ValueError:
        raise UsageError(f"{name} takes a {setting.kind.__name__}, got {text!r}") from None
    value = normalise(key, parsed)
    check_given({key: value})
    return key, value


def read_constraint(name: str, value: str | None) -> str | None:
    """A constraint flag's value as the setting holds it: ``--grammar FILE`` and
    ``--json-schema FILE`` read their file (the schema may also be given as JSON text),
    so a record's ``settings`` carry the text itself and replay anywhere."""
    if value is None or (name == "json_schema" and value.lstrip()[:1] in ("{", "[", '"')):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        what = "a readable file or JSON text" if name == "json_schema" else "a readable file"
        raise SettingError(name, f"must be {what}: {value!r} ({getattr(e, 'strerror', None) or e})") from None


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
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = -1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    bad_words: tuple[str, ...] = ()
    logit_bias: tuple[str, ...] = ()
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    samplers: str | None = None
    json_schema: str | None = None
    format: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] = ()
    grammar: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            check(f.name, getattr(self, f.name))
        constrained = [k for k in CONSTRAINT_KINDS if getattr(self, k)]
        if len(constrained) > 1:
            raise SettingError(constrained[1], f"cannot be combined with {flag_name(constrained[0])}: give one constraint")

    @property
    def constraint(self) -> dict[str, Any]:
        """The constraint settings that are set (at most one), by name."""
        return {k: getattr(self, k) for k in CONSTRAINT_KINDS if getattr(self, k)}

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (with no dynamic range) or top-k 1."""
        return (self.temperature == 0 and self.dynatemp_range == 0) or self.top_k == 1

    @property
    def order(self) -> tuple[str, ...]:
        """The orderable stages, in the order they run (``samplers``, else the default)."""
        return parse_samplers(self.samplers) if self.samplers else STAGES

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
    tokens: Any = None  # sampling.TokenRules: the ids behind text-valued settings, once a tokenizer resolved them

    def __post_init__(self) -> None:
        check("max_new_tokens", self.max_new_tokens)
        require(self.num_samples >= 1, f"--num-samples must be >= 1, got {self.num_samples}")
        require(all(self.stop), "--stop strings must not be empty")
        check_seed(self.seed)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return () if self.ignore_eos else self.eos_token_ids


def effective(gen: GenerationConfig) -> dict[str, Any]:
    """The settings a run used, as a record's ``settings``: ``max_new_tokens``, the
    temperature, and every other setting that is not at its neutral default, under the
    names a batch record takes, so the record can be replayed as is; and ``stop`` and
    ``ignore_eos`` when given."""
    out: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "temperature": gen.sampling.temperature}
    for f in fields(SamplingConfig):
        value = getattr(gen.sampling, f.name)
        if f.name != "temperature" and value != f.default and not (f.default_factory is not MISSING and value == f.default_factory()):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    if gen.stop:  # flags of run and batch rather than record fields, but they decide the text too
        out["stop"] = list(gen.stop)
    if gen.ignore_eos:
        out["ignore_eos"] = True
    return out


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise SettingError("seed", f"must be in [0, 2**63), got {seed}")


def from_json(name: str, value: Any) -> Any:
    """A batch record's JSON value for setting ``name``: type-checked, lists as tuples."""
    setting = BY_NAME[name]
    if name == "logit_bias" and isinstance(value, dict):  # {"TOKEN": BIAS}, BIAS a number or "-inf"
        value = [f"{token}={bias}" for token, bias in value.items()]
    if name == "json_schema" and isinstance(value, (dict, bool)):  # the schema itself, as JSON
        from llmgen.constraint import schema_text

        value = schema_text(value)
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
