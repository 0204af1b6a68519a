"""Rendering a chat template: Jinja's sandbox, in the dialect transformers renders, with bounds.

A chat template is code that comes with a model. Jinja's immutable sandbox already
refuses every escape through attributes; this one also bounds what a template may cost,
on the calling thread and without a watchdog to kill it. Every loop step, call,
attribute lookup, filter and intercepted operator first looks at the clock
(``SECONDS``). Every step that can grow a value looks at its size against the caller's
``max_chars``: before it builds it where the size is known in advance (``*``, ``+``,
``**``, ``~``, a call's integer arguments, captured output, the widths and precisions
of ``%``, ``format`` and ``str.format``), after it otherwise (a call's or a filter's
result). A template that loads another (``include``, ``extends``, ``import``) is
refused as it is parsed: there is nothing for it to load.

Whatever goes wrong comes out as one ``RenderError``: a one-line message, and the line
of the template where it happened.
"""

from __future__ import annotations

import functools
import json
import re
import time

from jinja2 import TemplateSyntaxError, nodes
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.visitor import NodeTransformer

# Real templates render in milliseconds; seconds of rendering is a loop that will not end.
SECONDS = 3.0
# No template needs a larger integer; a product squared in a loop would reach any size.
INT_BITS = 4096
# A printf-style conversion's width and precision: digits, or '*' to take them from the values.
PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?.", re.DOTALL)
LOADS = {nodes.Extends: "extends", nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import"}


class RenderError(Exception):
    """A template that failed: what went wrong, in one line, and the template line it happened on."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


class Refused(Exception):
    """The template's own ``raise_exception(message)``: it will not render this conversation."""


class OverBudget(Exception):
    """A template went past a bound, in time or in size."""


class Budget:
    """The clock and the size bound that one rendering runs against."""

    def __init__(self, max_chars: int, seconds: float | None = None) -> None:
        seconds = SECONDS if seconds is None else seconds  # read at each render, so a test can shorten it
        self.max_chars, self.seconds = max_chars, seconds
        self.deadline = time.monotonic() + seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise OverBudget(f"still running after {self.seconds:g} s (a loop that never ends?)")

    def fits(self, size: int) -> None:
        if size > self.max_chars:
            raise OverBudget(f"builds a value of over {self.max_chars} characters, more than the model's context can use")

    def fits_int(self, bits: int) -> None:
        if bits > INT_BITS:
            raise OverBudget(f"builds a number of over {INT_BITS} bits")

    def checked(self, value):
        """``value``, once its size is known to fit."""
        if isinstance(value, (str, list, tuple, dict)):
            self.fits(len(value))
        elif isinstance(value, int):
            self.fits_int(value.bit_length())
        return value

    def fits_width(self, digits: str) -> None:
        """A format's width or precision, refused before the field is formatted when it is
        larger than the size bound (``'{:>1000000000}'`` would take a gigabyte first)."""
        digits = digits.lstrip("0")
        if len(digits) > len(str(self.max_chars)) or (digits and int(digits) > self.max_chars):
            raise OverBudget(f"formats a field over {self.max_chars} characters wide, more than the model's context can use")

    def printf(self, text: str, values) -> None:
        """Checks the widths and precisions of ``text % values`` (the ``%`` operator, the
        ``format`` filter): those written in ``text``, and those a ``*`` takes from ``values``."""
        stars = False
        for width, precision in PRINTF.findall(text):
            for digits in (width, precision):
                stars = stars or digits == "*"
                self.fits_width(digits.strip("*"))
        if stars:
            self.arguments("a '*' width in %", values if isinstance(values, tuple) else (values,), {})

    def arguments(self, callee: str, args: tuple, kwargs: dict) -> None:
        """Refuses an integer argument larger than the size bound before the call: as a
        width or a count (``center``, ``format``, ``range``) it would build a value that
        large before its size could be looked at."""
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and abs(value) > self.max_chars:
                raise OverBudget(f"{callee} is given a number over {self.max_chars}, more than the model's context can use")

    def before_binop(self, operator: str, left, right) -> None:
        """Refuses ``left operator right`` before computing it when its result would not fit
        (``'x' * 10**9`` would take a gigabyte first; ``10**10**10`` never finish)."""
        sequences = (str, list, tuple)
        if operator == "*" and isinstance(left, int) and isinstance(right, sequences):
            left, right = right, left
        if operator == "*" and isinstance(left, sequences) and isinstance(right, int):
            self.fits(len(left) * max(right, 0))
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            self.fits_int(left.bit_length() + right.bit_length())
        elif operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            self.fits(len(left) + len(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self.fits_int(right * left.bit_length())
        elif operator == "%" and isinstance(left, str):
            self.printf(left, right)


class _Bounded(NodeTransformer):
    """Routes the steps Jinja compiles to plain Python through the budget: each loop's
    iterable through ``_counted`` (an empty loop body calls nothing that could look at
    the clock), each ``~`` through ``_concat`` (it joins strings without a call)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_counted", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_concat", [], [], None, None, lineno=node.lineno)


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox as transformers configures it for chat templates
    (``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``, a ``tojson``
    that leaves non-ASCII alone), with every operation checked against a ``Budget``."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self, budget: Budget) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.budget = budget
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f, budget) for name, f in self.filters.items()}
        self.filters["_counted"] = self._counted
        self.filters["_concat"] = self._concat

    def parse_bounded(self, source: str) -> nodes.Template:
        """The template's syntax tree with its loops and ``~`` routed through the budget;
        a template that would load another is refused here."""
        tree = self.parse(source)
        load = next(tree.find_all(tuple(LOADS)), None)
        if load is not None:
            raise RenderError(f"{{% {LOADS[type(load)]} %}} loads another template, and a chat template has none to load", load.lineno)
        return _Bounded().visit(tree)

    def call(__self, __context, __obj, *args, **kwargs):  # Jinja's names: a call may pass arguments named self or obj
        __self.budget.tick()
        if not isinstance(__obj, Macro):  # a macro's arguments are data, not widths
            __self.budget.arguments(f"{_called(__obj)}()", args, kwargs)
        return __self.budget.checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """Jinja's sandboxed ``str.format`` and ``format_map``, each field's width and
        precision checked first (``_Widths`` resolves the fields as they will be formatted)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        widths = _Widths(self)

        @functools.wraps(wrapped)
        def bounded(*args, **kwargs):
            if value.__name__ != "format_map":
                widths.vformat(value.__self__, args, kwargs)
            elif len(args) == 1 and not kwargs:  # its one argument is the mapping; else Jinja's TypeError
                widths.vformat(value.__self__, (), args[0])
            return wrapped(*args, **kwargs)

        return bounded

    def getattr(self, obj, attribute):
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.budget.tick()
        return super().getitem(obj, argument)

    def call_binop(self, context, operator, left, right):
        self.budget.tick()
        self.budget.before_binop(operator, left, right)
        return self.budget.checked(super().call_binop(context, operator, left, right))

    def concat(self, parts) -> str:
        """Output joined (the whole render, a ``{% set %}`` block, a macro's body),
        stopped as soon as it passes the size bound."""
        kept, size = [], 0
        for part in parts:
            size += len(part)
            self.budget.fits(size)
            kept.append(part)
        return "".join(kept)

    def _counted(self, iterable):
        for item in iterable:
            self.budget.tick()
            yield item

    def _concat(self, items: list) -> str:
        texts = [str(item) for item in items]
        self.budget.fits(sum(map(len, texts)))
        return "".join(texts)


class _Widths(SandboxedFormatter):
    """Goes through a ``str.format`` before it is run: each field's format spec, nested
    fields filled in, has its numbers (width, precision) checked before the field is
    formatted (a nested field's text may be the width of the one around it)."""

    def __init__(self, env: Sandbox) -> None:
        super().__init__(env)
        self.budget = env.budget

    def format_field(self, value, format_spec: str) -> str:
        for digits in re.findall(r"\d+", format_spec):
            self.budget.fits_width(digits)
        return super().format_field(value, format_spec)


def render(source: str, variables: dict, max_chars: int) -> str:
    """``source`` rendered with ``variables``, within ``SECONDS`` and ``max_chars``.
    Raises ``RenderError``, whatever the template did wrong."""
    sandbox = Sandbox(Budget(max_chars))
    try:
        tree = sandbox.parse_bounded(source)
        return sandbox.from_string(tree).render(**variables)
    except RenderError:
        raise
    except TemplateSyntaxError as e:
        raise RenderError(f"syntax error: {_one_line(e.message or '')}", e.lineno) from None
    except (Refused, OverBudget) as e:
        raise RenderError(_one_line(str(e)), _template_line(e)) from None
    except RecursionError as e:
        raise RenderError("calls itself too deeply (a macro that recurses without end?)", _template_line(e)) from None
    except Exception as e:  # the template is code from the model's directory: what it raises is its own error
        raise RenderError(f"{_one_line(str(e))} ({type(e).__name__})", _template_line(e)) from None


def _raise_exception(message) -> None:
    raise Refused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _bounded_filter(name: str, func, budget: Budget):
    """``func`` with its time, its arguments and its result's size checked. ``wraps``
    keeps the marker (``jinja_pass_arg``) that has Jinja pass it the context or the
    environment first; the value filtered comes next, and is data, not a width."""
    data = 2 if hasattr(func, "jinja_pass_arg") else 1

    @functools.wraps(func)
    def bounded(*args, **kwargs):
        budget.tick()
        budget.arguments(f"the filter {name}", args[data:], kwargs)
        if name == "format" and isinstance(args[0], str):  # printf-style: widths in the text
            budget.printf(args[0], kwargs or args[1:])
        return budget.checked(func(*args, **kwargs))

    return bounded


def _called(obj) -> str:
    """How a template names what it calls (the sandbox's ``range`` is ``safe_range``)."""
    name = getattr(obj, "__name__", "a call")
    return "range" if name == "safe_range" else name


def _template_line(error: BaseException) -> int | None:
    """The template line an error was raised at: Jinja rewrites the traceback so that a
    template's frames carry its own line numbers."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
