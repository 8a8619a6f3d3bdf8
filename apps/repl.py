"""`pocketlm chat`: a terminal chat loop. The KV cache carries over between turns, so each turn
only processes the new messages."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

try:  # line editing and history for input() where the platform has it
    import readline  # noqa: F401
except ImportError:
    pass

HELP = """commands:
  /help               this text
  /set NAME VALUE     change a setting: temp, top_k, top_p, min_p, max_tokens, seed, repeat_penalty
  /system TEXT        set the system prompt (clears the conversation)
  /clear              forget the conversation
  /stats              speed and memory of the last answer
  /bye                leave (also Ctrl+D)
Multi-line input: end a line with \\ to continue on the next, or wrap lines in \"\"\" … \"\"\".
Ctrl+C stops an answer (press it twice to break out of a long prompt evaluation)."""

_SETTABLE = {"temp": ("temperature", float), "temperature": ("temperature", float),
             "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
             "max_tokens": ("max_tokens", int), "seed": ("seed", int),
             "repeat_penalty": ("repeat_penalty", float)}


_BLOCK = '"""'


def _read_message(prompt: str) -> str | None:
    """One message: a line, lines joined by a trailing backslash, or a \"\"\" block."""
    lines = []
    block = False
    while True:
        try:
            line = input(prompt if not lines and not block else "... ")
        except EOFError:
            return None
        if not lines and not block and line.startswith(_BLOCK):
            block, line = True, line[len(_BLOCK):]
            if not line:
                continue
        if block:
            if line.endswith(_BLOCK):
                lines.append(line[:-len(_BLOCK)])
                return "\n".join(lines)
            lines.append(line)
            continue
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


@contextlib.contextmanager
def _ctrl_c_sets(cancel: threading.Event):
    """While generating, Ctrl+C asks the generation to stop (it ends at the next decode step or
    prompt chunk, leaving the cache consistent); a second Ctrl+C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _warm(llm, messages: list[dict]) -> None:
    """``llm.warm``; one that fails costs nothing (the turn then evaluates its whole
    prompt)."""
    try:
        llm.warm(messages)
    except Exception:   # noqa: BLE001  (a full context, a closed model: the turn reports it)
        pass


def chat_repl(llm, settings: dict, system: str | None = None, verbose: bool = False):
    """Read messages from stdin, stream answers to stdout, until /bye or end of input."""
    history: list[dict] = []
    last = None
    warmed = None
    print("pocketlm chat — /help for commands, /bye to leave", file=sys.stderr)
    while True:
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        if msgs != warmed:   # the next prompt's start runs while the user types
            warmed = list(msgs)
            threading.Thread(target=_warm, args=(llm, warmed), daemon=True).start()
        try:
            text = _read_message(">>> ")
        except KeyboardInterrupt:
            print()
            continue
        if text is None or text.strip() in ("/bye", "/exit", "/quit"):
            print()
            return
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, rest = text.strip().partition(" ")
            if cmd == "/help":
                print(HELP)
            elif cmd == "/clear":
                history.clear()
                print("(conversation cleared)")
            elif cmd == "/system":
                system = rest.strip() or None
                history.clear()
                print("(system prompt set; conversation cleared)")
            elif cmd == "/stats":
                if last is None or last.timings is None:
                    print("(no answer yet)")
                else:
                    t = last.timings
                    print(f"prompt {t.prompt_tokens} tok at {t.prompt_tps:.1f} tok/s, "
                          f"generation {t.generated_tokens} tok at {t.generation_tps:.1f} tok/s, "
                          f"peak RSS {t.peak_rss_bytes / 2**20:.0f} MiB")
            elif cmd == "/set":
                name, _, value = rest.strip().partition(" ")
                if name not in _SETTABLE or not value:
                    print(f"usage: /set NAME VALUE with NAME one of {', '.join(_SETTABLE)}")
                    continue
                key, cast = _SETTABLE[name]
                try:
                    changed = {**settings, key: cast(value)}
                    llm.defaults.replace(**changed)
                except (ValueError, TypeError) as e:
                    print(f"invalid value: {e}")
                    continue
                settings[key] = changed[key]
                print(f"({key} = {settings[key]})")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        history.append({"role": "user", "content": text})
        msgs = msgs + [history[-1]]
        answer = []
        cancel = threading.Event()
        try:
            with _ctrl_c_sets(cancel):
                for chunk in llm.chat(msgs, stream=True, cancel=cancel, **settings):
                    if chunk.text:
                        answer.append(chunk.text)
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                    last = chunk
            if last.finish_reason == "cancelled":
                print("\n(stopped)", end="")
        except KeyboardInterrupt:
            print("\n(stopped)", end="")
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"\nerror: {e}")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})
        if verbose and last is not None and last.timings is not None:
            t = last.timings
            print(f"[prompt {t.prompt_tps:.1f} tok/s, generation {t.generation_tps:.1f} tok/s, "
                  f"peak RSS {t.peak_rss_bytes / 2**20:.0f} MiB]", file=sys.stderr)
