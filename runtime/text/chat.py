"""Chat templates: render a conversation into a prompt string, the way transformers does.

GGUF files carry the model's Jinja template in ``tokenizer.chat_template``. Templates come from
untrusted files (CVE-2024-34359 was a GGUF template that ran shell commands), so they run in
jinja2's ``ImmutableSandboxedEnvironment`` with extra guards:

* a static pass refuses any access to ``_``-prefixed attributes before anything executes;
* a blocked attribute found at run time raises instead of rendering as empty;
* ``range`` items per render, the size of every string/list built, format widths and the
  output are bounded, so memory bombs stop before allocating;
* a render is bounded in CPU time (``CPU_LIMIT_S``, 2 s) and memory (``MEMORY_LIMIT``,
  256 MiB: the strings and lists it builds, plus what it keeps in lists and the output), checked
  at each call, operator, filter and loop iteration; ``ChatTemplate(cpu_limit=...,
  memory_limit=...)`` overrides them per template. A ``cancel`` event stops a render too.

Every failure surfaces as a one-line :class:`ChatTemplateError`.
"""
from __future__ import annotations

import contextvars
import functools
import json
import os
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

__all__ = ["ChatTemplate", "ChatTemplateError", "render_chat", "CHATML_TEMPLATE",
           "GEMMA_TEMPLATE", "FALLBACK_TEMPLATES"]

# Limits. A long real prompt (128k tokens) is well under 1M characters; these leave wide margin.
MAX_TEXT = 1 << 24          # characters in any one string value, and in the rendered prompt
MAX_ITEMS = 1 << 20         # elements in a list built by `*` or `+`
MAX_RANGE_TOTAL = 1_000_000  # `range` elements in one render, plus 2 * n_messages**2 (some
                             # real templates rescan earlier messages for every message)
MAX_ARG = 1_000_000         # largest integer argument to a call/filter (widths, counts)
# Defaults for ChatTemplate's cpu_limit / memory_limit; real templates render in milliseconds.
CPU_LIMIT_S = 2.0           # CPU seconds of the rendering thread
MEMORY_LIMIT = 256 << 20    # bytes (a character counts as one) built and kept by one render


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or was refused as unsafe.

    ``kind`` is one of ``"syntax"``, ``"raised"`` (the template's own ``raise_exception``),
    ``"security"``, ``"limit"``, ``"cancelled"`` or ``"render"``.
    """

    def __init__(self, message: str, kind: str = "render"):
        super().__init__(" ".join(message.split()))  # one line, whatever the template raised
        self.kind = kind


class _LimitError(Exception):
    pass


class _Exceeded(_LimitError):
    """A CPU or memory limit was hit; the message is the whole error."""


class _Cancelled(Exception):
    pass


class _TemplateRaised(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Per-render budget

@dataclass
class _Budget:
    cpu_limit: float
    memory_limit: int
    cancel: threading.Event | None = None
    inputs: frozenset = frozenset()  # ids of containers passed in by the caller
    range_left: int = MAX_RANGE_TOTAL
    kept: int = 0  # characters held in template-built lists and in the output so far

    def __post_init__(self) -> None:
        # thread CPU time: a render waiting for a core (or the GIL) is not charged for it
        self.cpu_deadline = time.thread_time() + self.cpu_limit

    def check_time(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()
        if time.thread_time() > self.cpu_deadline:
            raise _Exceeded(f"chat template exceeded its {self.cpu_limit:g} s CPU limit")

    def check_memory(self, n: int) -> None:
        if self.kept + n > self.memory_limit:
            raise _Exceeded(f"chat template exceeded its {self.memory_limit / 2**20:g} MiB "
                            "memory limit")

    def keep(self, n: int) -> None:
        self.kept += n
        self.check_memory(0)

    def iterate(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.check_time()
            yield item


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_budget",
                                                                         default=None)


def _check_time() -> None:
    b = _budget.get()
    if b is not None:
        b.check_time()


def _check_len(n: int, what: str = "string") -> None:
    if n > MAX_TEXT:
        raise _LimitError(f"template built a {what} of {n} characters (limit {MAX_TEXT})")
    b = _budget.get()
    if b is not None:
        b.check_memory(n)
        b.check_time()


def _check_int_args(args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ARG:
            raise _LimitError(f"template passed the integer {a} to a call (limit {MAX_ARG})")


def _text_size(x: Any) -> int:
    """Rough length of ``str(x)``, stopping once it passes MAX_TEXT.

    A list holding one huge string a million times is small in memory but not as text.
    """
    total, stack, seen = 0, [x], set()
    while stack and total <= MAX_TEXT:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (dict, list, tuple, set, frozenset)):
            if id(v) in seen:  # a list that contains itself prints as [...]
                total += 5
                continue
            seen.add(id(v))
            if isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            else:
                stack.extend(v)
            total += 2
        else:
            total += 24
    return total


def _check_text(*values: Any) -> None:
    _check_len(sum(len(v) if isinstance(v, str) else _text_size(v) for v in values))


def _container_ids(root: Any) -> frozenset:
    ids: set[int] = set()
    stack = [root]
    while stack:
        x = stack.pop()
        if isinstance(x, (dict, list, tuple, set)) and id(x) not in ids:
            ids.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)
    return frozenset(ids)


def _safe_range(*args: int) -> range:
    rng = range(*args)
    b = _budget.get()
    if b is not None:
        b.range_left -= len(rng)
        if b.range_left < 0:
            raise _LimitError("template exceeded its budget of range items")
        b.check_time()
    return rng


# %-format and str.format specs: a huge or starred width allocates without bound.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, values: Any) -> None:
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*" or (g and len(g) > 6):
                raise _LimitError("template used an unbounded %-format width")
    # a mapping key may repeat, so each field may cost as much as the largest value
    vals = values.values() if isinstance(values, Mapping) else \
        values if isinstance(values, (tuple, list)) else (values,)
    _check_len(len(fmt) + fmt.count("%") * max((_text_size(v) for v in vals), default=0))


def _check_brace_format(fmt: str, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
    nested = False
    n_fields = 0
    try:
        for _, field, spec, _ in string.Formatter().parse(fmt):
            n_fields += field is not None
            if spec:
                if "{" in spec:
                    nested = True
                elif any(len(d) > 6 for d in re.findall(r"\d+", spec)):
                    raise _LimitError("template used an unbounded format width")
    except ValueError:
        return  # malformed: str.format will raise its own error
    if nested:
        _check_int_args(args, kwargs)
    biggest = max((_text_size(v) for v in (*args, *kwargs.values())), default=0)
    _check_len(len(fmt) + n_fields * biggest)


# ---------------------------------------------------------------------------------------------
# Environment

def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _json_default(o: Any) -> Any:
    # `tools | map(attribute='function') | tojson` hands over a generator (llama.cpp accepts it)
    if isinstance(o, Iterator):
        return list(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: jinja's own tojson HTML-escapes and sorts keys.
    _check_text(x)
    out = json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                     sort_keys=sort_keys, default=_json_default)
    _check_len(len(out))
    return out


def _from_json(s: str) -> Any:
    # llama.cpp's template engine has it; DeepSeek V3.2+ templates use it on string arguments.
    return json.loads(s)


class _GenerationTag(Extension):
    """``{% generation %}…{% endgeneration %}`` (transformers marks assistant spans with it).

    Rendering is unaffected, so the body is emitted as is.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _GuardedCodeGenerator(CodeGenerator):
    # `~` compiles to a plain join that the sandbox never sees; route it through the env.
    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _finalize(value: Any) -> Any:
    # every {{ }} output passes here before it becomes text
    if not isinstance(value, str):
        _check_text(value)
    return value


def _guard_filter(name: str, f: Callable) -> Callable:
    skip = 1 + (1 if getattr(f, "jinja_pass_arg", None) is not None else 0)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_int_args(args[skip:], kwargs)
        value = args[skip - 1] if len(args) >= skip else None
        extra = args[skip:]
        if name == "replace" and isinstance(value, str) and len(extra) >= 2:
            old, new = str(extra[0]), str(extra[1])
            n = value.count(old) if old else len(value) + 1
            _check_len(len(value) + n * (len(new) - len(old)))
        elif name == "join" and not isinstance(value, (str, jinja2.Undefined)):
            value = list(value)
            args = (*args[:skip - 1], value, *extra)
            sep = str(extra[0]) if extra else str(kwargs.get("d", ""))
            _check_len(_text_size(value) + len(sep) * len(value))
        elif name == "format" and isinstance(value, str):
            _check_percent_format(value, kwargs if kwargs else extra)
        elif name in ("indent", "center") and isinstance(value, str):
            width = extra[0] if extra else kwargs.get("width", 4)
            w = len(width) if isinstance(width, str) else int(width or 0)
            _check_len(len(value) + (value.count("\n") + 1) * w)
        elif name in _STRINGIFYING and not isinstance(value, str):
            _check_text(value)
        out = f(*args, **kwargs)
        if isinstance(out, str):
            _check_len(len(out))
        return out

    return wrapper


# filters that turn a container value into its text
_STRINGIFYING = frozenset({"string", "trim", "upper", "lower", "capitalize", "title", "center",
                           "indent", "wordwrap", "truncate", "striptags", "urlencode", "escape",
                           "e", "forceescape", "safe", "urlize", "pprint", "wordcount"})


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _GuardedCodeGenerator

    def __init__(self) -> None:
        # trim/lstrip as transformers' apply_chat_template compiles templates
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                         extensions=[_GenerationTag, loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters["from_json"] = _from_json
        self.filters = {k: _guard_filter(k, f) for k, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # unused by chat templates, and an easy CPU bomb
        self.globals["range"] = _safe_range
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if super().is_safe_attribute(obj, attr, value):
            return True
        # Kimi-K2 templates queue tool-call ids with list.append/pop (llama.cpp allows it).
        # Allowed only on lists the template built itself: the caller's data stays immutable.
        if isinstance(obj, list) and attr in ("append", "pop"):
            b = _budget.get()
            return b is not None and id(obj) not in b.inputs
        return False

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                total = len(seq) * max(n, 0)
                if isinstance(seq, str):
                    _check_len(total)
                elif total > MAX_ITEMS:
                    raise _LimitError(f"template built a list of {total} items")
                else:
                    _check_len(8 * total, "list")  # a pointer per item
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and max(abs(left), 2).bit_length() * right > 1 << 16:
                raise _LimitError("template computed an oversized power")
        elif operator == "%":
            if isinstance(left, str):
                _check_percent_format(left, right if isinstance(right, (tuple, Mapping))
                                      else (right,))
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                _check_len(len(left) + len(right))
            elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)) \
                    and len(left) + len(right) > MAX_ITEMS:
                raise _LimitError("template built an oversized list")
        out = self.binop_table[operator](left, right)
        if operator == "%" and isinstance(out, str):
            _check_len(len(out))
        return out

    def guarded_iter(self, iterable: Any) -> Any:
        b = _budget.get()
        return iterable if b is None else b.iterate(iterable)

    def guarded_concat(self, parts: tuple) -> str:
        _check_text(*parts)
        return "".join(p if isinstance(p, str) else str(p) for p in parts)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if __obj is not _safe_range:
            _check_int_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, list) and name == "append" and args:
            b = _budget.get()
            if b is not None:  # what a list keeps outlives the expression that built it
                b.keep(_text_size(args[0]))
        elif isinstance(owner, str):
            if name == "join" and args:
                items = list(args[0])
                args = (items, *args[1:])
                _check_len(_text_size(items) + len(owner) * len(items))
            elif name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
                widths = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
                _check_len(max(len(owner), 1) * max(widths, default=1))
            elif name == "replace" and len(args) >= 2:
                old, new = str(args[0]), str(args[1])
                n = owner.count(old) if old else len(owner) + 1
                _check_len(len(owner) + n * (len(new) - len(old)))
        _check_time()
        out = super().call(__context, __obj, *args, **kwargs)
        if isinstance(out, str):
            _check_len(len(out))
        return out

    def wrap_str_format(self, value: Any) -> Any:
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        src = value.__self__

        def guarded(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                _check_brace_format(src, (), args[0])
            else:
                _check_brace_format(src, args, kwargs)
            out = fmt(*args, **kwargs)
            _check_len(len(out))
            return out

        return guarded


def _guarded_iter(expr: nodes.Expr) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute("guarded_iter"), [expr], [], None, None,
                      lineno=expr.lineno)


def _guard_loops(ast: nodes.Template) -> None:
    """Route every ``for`` loop's iterable through ``guarded_iter``: an empty loop body makes
    no call or operation, so without this nested loops would never meet a check."""
    loops = list(ast.find_all(nodes.For))
    reentries = {id(c): c for f in loops if f.recursive for c in f.find_all(nodes.Call)
                 if isinstance(c.node, nodes.Name) and c.node.name == "loop" and c.args}
    for f in loops:
        f.iter = _guarded_iter(f.iter)
    for c in reentries.values():  # loop(children) iterates again, outside f.iter
        c.args[0] = _guarded_iter(c.args[0])


def _static_check(ast: nodes.Template) -> None:
    """Refuse templates that name private/dunder attributes anywhere, before running them."""
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise ChatTemplateError(f"chat template refused: {type(node).__name__.lower()} of other "
                                f"templates is not supported (line {node.lineno})", "security")
    for node in ast.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        name = None
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args \
                and isinstance(node.args[0], nodes.Const):
            name = node.args[0].value
        if isinstance(name, str) and name.startswith("_"):
            raise ChatTemplateError(
                f"chat template refused: access to private attribute {name!r} "
                f"(line {node.lineno})", "security")


_ENV: _Sandbox | None = None


def _env() -> _Sandbox:
    global _ENV
    if _ENV is None:
        _ENV = _Sandbox()
    return _ENV


def _template_line(exc: BaseException, name: str) -> str:
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


# ---------------------------------------------------------------------------------------------
# Built-in templates

#: ChatML, as transformers' old default template; content may be a string or a list of parts.
CHATML_TEMPLATE = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c }}"
    "{%- elif c is iterable -%}{%- for p in c if p.type == 'text' -%}{{ p.text }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content(message['content']) + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

#: Gemma 3's official instruction template (system text folded into the first user turn).
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

#: Fallbacks for GGUFs without ``tokenizer.chat_template``, by ``general.architecture``;
#: anything else gets ChatML.
FALLBACK_TEMPLATES: dict[str, str] = {
    "gemma": GEMMA_TEMPLATE,
    "gemma2": GEMMA_TEMPLATE,
    "gemma3": GEMMA_TEMPLATE,
    "gemma3n": GEMMA_TEMPLATE,
}


# ---------------------------------------------------------------------------------------------
# Public API

class ChatTemplate:
    """A compiled chat template; compile once, render many times (thread-safe)."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 name: str = "chat_template", cpu_limit: float | None = None,
                 memory_limit: int | None = None):
        """Compile ``source``; raises :class:`ChatTemplateError` if it is invalid or unsafe.

        ``cpu_limit`` (seconds) and ``memory_limit`` (bytes) bound each render; None: the
        module's ``CPU_LIMIT_S`` and ``MEMORY_LIMIT`` at render time. Both stay settable as
        attributes.
        """
        self.source = source
        self.cpu_limit = cpu_limit
        self.memory_limit = memory_limit
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        env = _env()
        try:
            ast = env.parse(source, name=name)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error: {e.message} (line {e.lineno})",
                                    "syntax") from None
        _static_check(ast)
        _guard_loops(ast)
        try:
            code = env.compile(ast, name=name, filename=name)
            self._template = env.template_class.from_code(env, code, env.make_globals(None))
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}", "syntax") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **tokens: str) -> "ChatTemplate":
        """Load a template from a ``.jinja`` file (a user override)."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), name=os.path.basename(os.fspath(path)), **tokens)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any],
                      override_path: str | os.PathLike | None = None) -> "ChatTemplate":
        """The template for a GGUF: ``override_path`` if given, else ``tokenizer.chat_template``,
        else a built-in fallback for ``general.architecture`` (ChatML by default).

        ``bos_token``/``eos_token`` are the vocabulary strings of the GGUF's BOS/EOS ids.
        """
        tokens = meta.get("tokenizer.ggml.tokens")
        special = {}
        for key, field in (("bos_token", "tokenizer.ggml.bos_token_id"),
                           ("eos_token", "tokenizer.ggml.eos_token_id")):
            tid = meta.get(field)
            if tokens is not None and tid is not None and 0 <= int(tid) < len(tokens):
                special[key] = str(tokens[int(tid)])
        if override_path is not None:
            return cls.from_file(override_path, **special)
        src = meta.get("tokenizer.chat_template")
        if src:
            return cls(str(src), name="tokenizer.chat_template", **special)
        arch = str(meta.get("general.architecture", ""))
        return cls(FALLBACK_TEMPLATES.get(arch, CHATML_TEMPLATE),
                   name=f"builtin:{arch or 'chatml'}", **special)

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, cancel: threading.Event | None = None,
               **extra: Any) -> str:
        """Render ``messages`` (OpenAI/transformers-style dicts) into the prompt string.

        ``extra`` is passed to the template as variables (``bos_token``/``eos_token`` override
        the template's own, ``enable_thinking``, ``date_string``, …). Setting ``cancel``
        stops the render with a ``ChatTemplateError`` of kind ``"cancelled"``.
        """
        ctx = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
               "messages": messages, "tools": tools,
               "add_generation_prompt": add_generation_prompt}
        n = len(messages) + len(tools or ())
        budget = _Budget(cpu_limit=CPU_LIMIT_S if self.cpu_limit is None else self.cpu_limit,
                         memory_limit=MEMORY_LIMIT if self.memory_limit is None
                         else self.memory_limit,
                         cancel=cancel, range_left=MAX_RANGE_TOTAL + 2 * n * n,
                         inputs=_container_ids(ctx))
        token = _budget.set(budget)
        try:
            out: list[str] = []
            total = 0
            for chunk in self._template.generate(**ctx):
                total += len(chunk)
                if total > MAX_TEXT:
                    raise _LimitError(f"rendered prompt exceeds {MAX_TEXT} characters")
                budget.keep(len(chunk))
                out.append(chunk)
            return "".join(out)
        except ChatTemplateError:
            raise
        except _Exceeded as e:
            raise ChatTemplateError(f"{e}{_template_line(e, self.name)}", "limit") from None
        except _Cancelled:
            raise ChatTemplateError("chat template rendering was cancelled", "cancelled") \
                from None
        except MemoryError as e:  # the process ran out before the template's own limit
            raise ChatTemplateError("chat template ran out of memory"
                                    f"{_template_line(e, self.name)}", "limit") from None
        except _TemplateRaised as e:
            raise ChatTemplateError(f"chat template raised: {e}", "raised") from None
        except SecurityError as e:
            raise ChatTemplateError(f"chat template refused: {e}{_template_line(e, self.name)}",
                                    "security") from None
        except (_LimitError, OverflowError, RecursionError) as e:
            raise ChatTemplateError(f"chat template refused: {str(e) or type(e).__name__}"
                                    f"{_template_line(e, self.name)}", "limit") from None
        except Exception as e:  # any error inside the template's own logic
            raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}"
                                    f"{_template_line(e, self.name)}", "render") from None
        finally:
            _budget.reset(token)


    def render_marked(self, messages: list[dict], specials: Iterable[str], *,
                      tools: list[dict] | None = None, **kwargs: Any
                      ) -> tuple[str, list[tuple[int, int]]]:
        """:meth:`render`, and the spans of the prompt where the caller's strings (messages and
        tools, keys included) contain one of ``specials`` (control-token texts).

        Tokenize with ``Tokenizer.encode(text, parse_special=True, plain=spans)``: control
        tokens then come only from the template's own text, and a message cannot forge a role
        boundary. Each occurrence is fenced with per-render markers the template passes through.
        """
        pattern = _specials_pattern(tuple(specials))
        if pattern is None:
            return self.render(messages, tools=tools, **kwargs), []
        nonce = str(secrets.randbits(48))  # unguessable: a message cannot close a fence
        start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"

        def fence(x: Any) -> Any:
            if isinstance(x, str):
                return pattern.sub(lambda m: start + m.group() + end, x)
            if isinstance(x, dict):
                return {fence(k): fence(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [fence(v) for v in x]
            return x

        text = self.render(fence(messages), tools=fence(tools), **kwargs)
        # A span is the token right after a start or before an end marker, so a fence the
        # template cut in half (a split or a slice of the content) still covers its token.
        parts = re.split(f"({start}|{end})", text)
        out, spans, n = [], [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:
                m = pattern.match(part) if k and parts[k - 1] == start else None
                if m:
                    spans.append((n, n + m.end()))
                out.append(part)
                n += len(part)
            elif part == end and (k < 2 or parts[k - 2] != start):
                size = max((len(t) for t in specials if t and parts[k - 1].endswith(t)),
                           default=0)
                if size:
                    spans.append((n - size, n))
        return "".join(out), spans


@functools.lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern | None:
    texts = sorted({t for t in specials if t}, key=len, reverse=True)  # longest match first
    return re.compile("|".join(map(re.escape, texts))) if texts else None


@functools.lru_cache(maxsize=16)
def _compiled(source: str, name: str) -> ChatTemplate:
    return ChatTemplate(source, name=name)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None,
                **extra: Any) -> str:
    """Render ``messages`` with the Jinja chat template source ``template``.

    Compiled templates are cached by source, so repeated calls do not recompile.
    """
    return _compiled(template, "chat_template").render(
        messages, add_generation_prompt=add_generation_prompt, tools=tools,
        bos_token=bos_token, eos_token=eos_token, **extra)
