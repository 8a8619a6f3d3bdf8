"""`pocketlm chat`: a terminal chat loop. The KV cache carries over between turns, so each turn
only processes the new messages."""
from __future__ import annotations

import sys

HELP = """commands:
  /help               this text
  /set NAME VALUE     change a setting: temp, top_k, top_p, min_p, max_tokens, seed, repeat_penalty
  /system TEXT        set the system prompt (clears the conversation)
  /clear              forget the conversation
  /stats              speed and memory of the last answer
  /bye                leave (also Ctrl+D)
End a line with \\ to continue typing on the next line. Ctrl+C stops an answer."""

_SETTABLE = {"temp": ("temperature", float), "temperature": ("temperature", float),
             "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
             "max_tokens": ("max_tokens", int), "seed": ("seed", int),
             "repeat_penalty": ("repeat_penalty", float)}


def _read_message(prompt: str) -> str | None:
    lines = []
    while True:
        try:
            line = input(prompt if not lines else "... ")
        except EOFError:
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def chat_repl(llm, settings: dict, system: str | None = None, verbose: bool = False):
    """Read messages from stdin, stream answers to stdout, until /bye or end of input."""
    history: list[dict] = []
    last = None
    print("pocketlm chat — /help for commands, /bye to leave", file=sys.stderr)
    while True:
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
                    settings[key] = cast(value)
                    llm.defaults.replace(**{k: v for k, v in settings.items()})
                except (ValueError, TypeError) as e:
                    print(f"invalid value: {e}")
                    continue
                print(f"({key} = {settings[key]})")
            else:
                print(f"unknown command {cmd}; /help lists them")
            continue
        history.append({"role": "user", "content": text})
        msgs = ([{"role": "system", "content": system}] if system else []) + history
        answer = []
        try:
            for chunk in llm.chat(msgs, stream=True, **settings):
                if chunk.text:
                    answer.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                last = chunk
        except KeyboardInterrupt:
            print("\n(stopped)")
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
