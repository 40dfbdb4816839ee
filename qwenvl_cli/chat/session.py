"""The interactive chat session: a state machine plus a loop.

``ChatSession.handle(line)`` is pure: it updates the session and returns an
:class:`Action` (print this, generate with these messages, exit). The loop
(:func:`run_repl`) owns input and output: it reads lines, streams answers from a
``respond`` callback, and turns Ctrl-C during an answer into "stop, keep what was said".
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

from qwenvl_cli import messages as msgs
from qwenvl_cli.errors import QvlError, UsageError
from qwenvl_cli.generation import Answer, Chunk, GenerationParams, stats_line

Respond = Callable[[list[dict[str, Any]], GenerationParams], Iterator[Chunk]]
CheckMedia = Callable[[str, str], str]  # (kind, reference) -> normalised reference, or raise

HELP = """Commands:
  /image PATH        attach an image (path, URL or data URI) to the next message
  /video PATH        attach a video (file or folder of frames) to the next message
  /system TEXT       set the system prompt (/system alone clears it)
  /set NAME VALUE    max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop
  /show              model, settings and token usage of this conversation
  /save FILE         save the conversation as JSON (media as absolute paths;
                     /save --embed FILE puts the media in the file)
  /load FILE         load a conversation saved with /save
  /retry             generate the last answer again
  /undo              forget the last question and its answer
  /clear             forget the whole conversation
  /help              this help
  /exit              leave (or Ctrl-D)
Lines between \"\"\" markers form one message. Ctrl-C stops an answer and keeps what was said."""

COMMANDS = ("image", "video", "system", "set", "show", "save", "load", "retry", "undo", "clear",
            "help", "exit", "quit", "bye")
SETTABLE = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
SAVE_VERSION = 1


@dataclass(frozen=True)
class Action:
    kind: str  # "print", "error", "generate", "exit", "more" (inside a \"\"\" block), "none"
    text: str = ""
    messages: list[dict[str, Any]] | None = None


@dataclass
class ChatSession:
    params: GenerationParams = field(default_factory=GenerationParams)
    system: str | None = None
    model: str = "model"
    check_media: CheckMedia | None = None
    image_options: dict[str, Any] = field(default_factory=dict)
    video_options: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    _block: list[str] | None = None
    _turn: dict[str, Any] | None = None  # the user turn being answered
    _retried: list[dict[str, Any]] | None = None  # the turn /retry replaces, put back if it fails
    _retry_explained: bool = False

    # --- input ------------------------------------------------------------------------

    def handle(self, line: str) -> Action:
        """One line of input -> what to do. Never raises for bad input."""
        if self._block is not None:
            return self._continue_block(line)
        stripped = line.strip()
        if stripped.startswith('"""'):
            rest = stripped[3:]
            if len(rest) >= 3 and rest.endswith('"""'):
                return self.ask(rest[:-3])
            self._block = [rest] if rest else []
            return Action("more")
        if not stripped:
            return Action("none")
        if stripped.startswith("/"):
            name, _, arg = stripped[1:].partition(" ")
            return self.command(name.lower(), arg.strip())
        return self.ask(line.rstrip("\n"))

    def _continue_block(self, line: str) -> Action:
        assert self._block is not None
        if line.rstrip().endswith('"""'):
            self._block.append(line.rstrip()[:-3])
            text, self._block = "\n".join(self._block).strip("\n"), None
            return self.ask(text)
        self._block.append(line.rstrip("\n"))
        return Action("more")

    def ask(self, text: str) -> Action:
        if not text.strip() and not (self.images or self.videos):
            return Action("none")
        turn = msgs.user_message(text, self.images, self.videos)
        turn = msgs.with_defaults([turn], self.image_options, self.video_options)[0]
        self.images, self.videos = [], []
        self._turn = turn
        return Action("generate", messages=self.conversation() + [turn])

    def conversation(self) -> list[dict[str, Any]]:
        head = [msgs.text_message("system", self.system)] if self.system else []
        return head + self.history

    # --- answers ------------------------------------------------------------------------

    def commit(self, answer: Answer) -> None:
        """Record the question and its (possibly partial) answer."""
        if self._turn is None:
            return
        self.history += [self._turn, msgs.text_message("assistant", answer.text)]
        self._turn, self._retried = None, None
        if answer.usage:
            self.usage["prompt_tokens"] += answer.usage.prompt_tokens
            self.usage["completion_tokens"] += answer.usage.completion_tokens

    def fail(self) -> None:
        """The answer could not be generated: forget the turn, give back its media; a failed
        /retry puts the question and answer it replaced back, as they were."""
        if self._retried is not None:
            self.history += self._retried
            self._turn, self._retried = None, None
            return
        if self._turn is not None:
            for part in self._turn["content"]:
                if part["type"] == "image":
                    self.images.append(part["image"])
                elif part["type"] == "video":
                    self.videos.append(part["video"])
        self._turn = None

    # --- commands -----------------------------------------------------------------------

    def command(self, name: str, arg: str) -> Action:
        handler = getattr(self, f"_cmd_{name}", None)
        if name in ("quit", "bye"):
            handler = self._cmd_exit
        if handler is None:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            hint = f" (did you mean /{close[0]}?)" if close else ""
            return Action("error", f"unknown command /{name}{hint}; /help lists the commands")
        try:
            return handler(arg)
        except QvlError as exc:
            return Action("error", exc.message + (f" ({exc.hint})" if exc.hint else ""))

    def _cmd_help(self, arg: str) -> Action:
        return Action("print", HELP)

    def _cmd_exit(self, arg: str) -> Action:
        return Action("exit")

    def _attach(self, kind: str, arg: str, target: list[str]) -> Action:
        arg = unquote_path(arg)
        if not arg:
            return Action("error", f"/{kind} needs a path, URL or data URI")
        ref = self.check_media(kind, arg) if self.check_media else arg
        target.append(ref)
        return Action("print", f"{kind} attached to the next message: {arg if len(arg) < 80 else arg[:77] + '...'}")

    def _cmd_image(self, arg: str) -> Action:
        return self._attach("image", arg, self.images)

    def _cmd_video(self, arg: str) -> Action:
        return self._attach("video", arg, self.videos)

    def _cmd_system(self, arg: str) -> Action:
        self.system = arg or None
        return Action("print", "system prompt set" if arg else "system prompt cleared")

    def _cmd_clear(self, arg: str) -> Action:
        self.history, self.images, self.videos = [], [], []
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        return Action("print", "conversation cleared")

    def _cmd_undo(self, arg: str) -> Action:
        if not self.history:
            return Action("error", "nothing to undo")
        self.history = self.history[:-2]
        return Action("print", "forgot the last question and answer")

    def _cmd_retry(self, arg: str) -> Action:
        if len(self.history) < 2:
            return Action("error", "no answer to retry yet")
        self._turn, self._retried = self.history[-2], self.history[-2:]
        self.history = self.history[:-2]
        note = ""
        p = self.params
        if not self._retry_explained and p.temperature is None and p.top_k is None and p.top_p is None:
            self._retry_explained = True  # said once: the checkpoint's defaults decide
            note = ("with the checkpoint's sampling defaults (Qwen2-VL's are near greedy: top_k 1) /retry "
                    "gives the same answer; /set temperature 0.7, /set top_k 0 and /set top_p 0.9 vary it")
        return Action("generate", note, messages=self.conversation() + [self._turn])

    def _cmd_set(self, arg: str) -> Action:
        name, _, value = arg.partition(" ")
        name, value = name.strip().lower(), value.strip()
        if name not in SETTABLE:
            close = difflib.get_close_matches(name, SETTABLE, n=1)
            raise UsageError(f"cannot set {name!r}" + (f" (did you mean {close[0]}?)" if close else ""),
                             "settable: " + ", ".join(SETTABLE))
        self.params = replace(self.params, **{name: parse_setting(name, value)}).validated()
        return Action("print", f"{name} = {getattr(self.params, name)!r}")

    def _cmd_show(self, arg: str) -> Action:
        settings = {f.name: getattr(self.params, f.name) for f in fields(self.params)
                    if f.name != "ignore_eos" and getattr(self.params, f.name) not in (None, ())}
        lines = [f"model: {self.model}",
                 "settings: " + (", ".join(f"{k}={v!r}" for k, v in settings.items()) or "checkpoint defaults"),
                 f"system: {self.system!r}" if self.system else "system: (default)",
                 f"turns: {len(self.history) // 2}; tokens used: {self.usage['prompt_tokens']} prompt + "
                 f"{self.usage['completion_tokens']} completion"]
        if self.images or self.videos:
            lines.append(f"attached for the next message: {len(self.images)} image(s), {len(self.videos)} video(s)")
        return Action("print", "\n".join(lines))

    def _cmd_save(self, arg: str) -> Action:
        embed = arg.startswith("--embed")
        arg = unquote_path(arg[len("--embed"):] if embed else arg)
        if not arg:
            raise UsageError("/save needs a file name", "e.g. /save chat.json, or /save --embed chat.json")
        path = Path(arg).expanduser()
        try:
            history = saved_media(self.history, embed)
        except OSError as exc:
            raise UsageError(f"cannot embed {exc.filename}: {exc.strerror}", "/save without --embed") from None
        data = {"version": SAVE_VERSION, "system": self.system, "messages": history,
                "params": {k: v for k, v in asdict(self.params).items()  # what differs from the defaults
                           if v != getattr(GenerationParams(), k)}}
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
            tmp.replace(path)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}", "choose another file") from None
        return Action("print", f"saved {len(self.history) // 2} turns to {path}")

    def _cmd_load(self, arg: str) -> Action:
        if not arg:
            raise UsageError("/load needs a file name", "e.g. /load chat.json")
        arg = unquote_path(arg)
        self.system, self.history, params = load_conversation(Path(arg).expanduser())
        self.params = replace(self.params, **params).validated()
        return Action("print", f"loaded {len(self.history) // 2} turns from {arg}")


def unquote_path(arg: str) -> str:
    """A path as file managers paste it: '"a b.png"', "'a b.png'" or a\\ b.png -> a b.png."""
    arg = arg.strip()
    if len(arg) >= 2 and arg[0] == arg[-1] and arg[0] in "'\"":
        return arg[1:-1]
    if "\\" in arg and os.sep == "/":
        import shlex

        try:
            parts = shlex.split(arg)
        except ValueError:
            return arg
        return parts[0] if len(parts) == 1 else arg
    return arg


def saved_media(history: list[dict[str, Any]], embed: bool) -> list[dict[str, Any]]:
    """The conversation as /save writes it: local media as absolute paths (so /load works from
    any folder), or with ``embed`` as data URIs (the file then stands alone)."""

    def ref(value: Any, mime: str) -> Any:
        if isinstance(value, list):
            return [ref(item, "image/jpeg") for item in value]
        path = msgs.local_path(value) if isinstance(value, str) else None
        if path is None:
            return value
        if embed and path.is_file():
            return msgs.data_uri(path, mime)
        return str(path.absolute())

    out = []
    for message in history:
        parts = []
        for part in message["content"]:
            if part.get("type") == "image":
                part = {**part, "image": ref(part["image"], "image/png")}
            elif part.get("type") == "video":
                part = {**part, "video": ref(part["video"], "video/mp4")}
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def parse_setting(name: str, value: str) -> Any:
    if name == "stop":
        return tuple(s for s in value.split("|") if s) if value else ()
    if value.lower() in ("", "none", "default"):
        return None
    try:
        return int(value) if name in ("max_tokens", "top_k", "seed") else float(value)
    except ValueError:
        raise UsageError(f"{name} needs a number, not {value!r}", f"e.g. /set {name} 1") from None


def load_conversation(path: Path) -> tuple[str | None, list[dict[str, Any]], dict[str, Any]]:
    """Read a /save file; every problem is a UsageError naming the file."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", "check the path") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON (line {exc.lineno})", "load a file written by /save") from None
    if not isinstance(data, dict) or data.get("version") != SAVE_VERSION:
        raise UsageError(f"{path} is not a qvl conversation (version {SAVE_VERSION})", "load a file written by /save")
    history = msgs.from_openai(data.get("messages") or []) if data.get("messages") else []
    params = data.get("params") or {}
    unknown = set(params) - set(SETTABLE)
    if unknown:
        raise UsageError(f"{path}: unknown settings {', '.join(sorted(unknown))}", "load a file written by /save")
    if "stop" in params:
        params["stop"] = tuple(params["stop"])
    return data.get("system"), history, params


# --- the loop ---------------------------------------------------------------------------


def stream_answer(respond: Respond, session: ChatSession, messages: list[dict[str, Any]],
                  out: TextIO, err: TextIO, stats: bool = False) -> Answer:
    """Stream one answer to ``out``; Ctrl-C stops it and keeps what was said."""
    answer = Answer()
    try:
        for chunk in respond(messages, session.params):
            answer.add(chunk)
            if chunk.text:
                out.write(chunk.text)
                out.flush()
    except KeyboardInterrupt:
        answer.finish_reason = "cancelled"
        out.write("\n")
        err.write("[answer stopped]\n")
        session.commit(answer)
        return answer
    except QvlError as exc:
        session.fail()
        out.write("\n") if answer.text else None
        err.write(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else "") + "\n")
        return answer
    out.write("\n")
    session.commit(answer)
    if stats:
        err.write(stats_line(answer) + "\n")
    return answer


def run_repl(session: ChatSession, respond: Respond, read_line: Callable[[str], str],
             out: TextIO = sys.stdout, err: TextIO = sys.stderr, stats: bool = False) -> int:
    """Read, handle, print until /exit or end of input. Returns the exit code."""
    err.write(f"Chatting with {session.model}. /help for commands, /exit or Ctrl-D to leave.\n")
    while True:
        try:
            line = read_line('... ' if session._block is not None else '>>> ')
        except EOFError:
            err.write("\n")
            return 0
        except KeyboardInterrupt:
            err.write("\n(use /exit or Ctrl-D to leave)\n")
            session._block = None
            continue
        action = session.handle(line)
        if action.kind == "exit":
            return 0
        if action.kind == "print":
            err.write(action.text + "\n")
        elif action.kind == "error":
            err.write(f"error: {action.text}\n")
        elif action.kind == "generate":
            if action.text:
                err.write(f"note: {action.text}\n")
            stream_answer(respond, session, action.messages or [], out, err, stats)


def line_reader(interactive: bool, history_file: Path | None) -> Callable[[str], str]:
    """prompt_toolkit with persistent history and path completion on a terminal,
    plain lines otherwise (scripts, pipes, tests)."""
    if not interactive:
        def read_plain(prompt: str) -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")

        return read_plain
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import PathCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    history = InMemoryHistory()
    if history_file is not None:
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(history_file))
        except OSError:
            pass
    prompt_session = PromptSession(history=history, completer=_MediaPathCompleter(PathCompleter(expanduser=True)),
                                   complete_while_typing=False)
    return prompt_session.prompt


class _MediaPathCompleter:
    """Completes file paths after /image, /video, /save and /load."""

    def __init__(self, paths: Any) -> None:
        self.paths = paths

    def get_completions(self, document: Any, complete_event: Any):
        from prompt_toolkit.document import Document

        text = document.text_before_cursor
        for command in ("/image ", "/video ", "/save ", "/load "):
            if text.startswith(command):
                sub = Document(text[len(command):], len(text) - len(command))
                yield from self.paths.get_completions(sub, complete_event)
                return

    async def get_completions_async(self, document: Any, complete_event: Any):
        for completion in self.get_completions(document, complete_event):
            yield completion
