"""Render a normalised record into one training string plus the character spans that carry the loss.

The loss covers each assistant reply and the end-of-turn token that closes it (so the model learns to stop),
nothing else: not the system prompt, not the user turns, not the role markers. Two renderings exist:

* ``chat``: the tokenizer's own chat template, so training text matches what inference will feed the model.
  Running Jinja for every record is far slower than tokenising it, so the template is rendered once per
  conversation *shape* (system or not, number of turns) with sentinel contents; the literal pieces between
  the sentinels are cached and records are rendered by string joins. A template that inspects or alters
  content (trims it, strips leading newlines, splits reasoning at ``</think>``) is detected while probing with
  such contents and then rendered exactly per record, with spans found by rendering growing prefixes of the
  conversation.
* ``mftcoder``: MFTCoder's role markers (``<s>system``, ``<s>human``, ``<s>bot``, each followed by a newline),
  with EOS closing every bot turn; used by default when the tokenizer has no chat template.

The end marker of an assistant turn is the first special token the template writes after the content
(``<|im_end|>``, ``<|eot_id|>``, ``</s>``); a template that writes none gets the tokenizer's EOS inserted.
Text after the last assistant turn is dropped: no target reads it. Assistant turns marked context only
keep their text but get no span.

Conversations with tool calls are rendered exactly per record, each assistant turn's span being what the
template writes after the generation prompt (tool-call syntax included) up to its end marker; a template
that ignores tool calls or tool turns (found by probing it once) makes such records bad, naming the record.
A plain prompt/completion (:class:`Completion`) and a FIM sample are raw text without a template, the
loss on the completion (the middle) and EOS.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

from mftcoder_coba.data_prep import fim
from mftcoder_coba.data_prep.formats import BadRecord, Chat, Completion, Text
from mftcoder_coba.errors import UserError

log = logging.getLogger(__name__)

TemplateChoice = Literal["auto", "chat", "mftcoder"]
Span = tuple[int, int]
MFTCODER_MARKERS = {"system": "<s>system\n", "user": "<s>human\n", "assistant": "<s>bot\n"}
_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: never produced or touched by a template
# contents a template may test or edit (Qwen3's and DeepSeek-R1's '</think>' split, `.lstrip('\n')`, `| trim`):
# a shape is served by string joins only when the template writes each of them verbatim
_PROBE_WRAPS = ((" \n", " \n"), ("\n", "\n"), ("<think>\nr\n</think>\n\n", ""))


# per conversation shape: text before the first content, then per content (text after it, loss length into
# that text for an assistant turn, else None); the text after the last assistant turn is cut at its marker
_Plan = tuple[str, list[tuple[str, "int | None"]]]


def _sentinel(i: int) -> str:
    return f"{_OPEN}{i}{_CLOSE}"


def _roles_contents(chat: Chat) -> tuple[list[str], list[str]]:
    """The conversation as parallel lists, the system prompt (if any) first."""
    head = [("system", chat.system)] if chat.system is not None else []
    roles, contents = zip(*(head + list(chat.turns)))
    return list(roles), list(contents)


def _messages(chat: Chat, contents: list[str] | None = None) -> list[dict[str, str]]:
    roles, own = _roles_contents(chat)
    return [{"role": r, "content": t} for r, t in zip(roles, own if contents is None else contents)]


class Renderer:
    """Turns :class:`Chat` / :class:`Text` records into ``(text, loss character spans)``."""

    def __init__(self, tokenizer: Any, template: TemplateChoice = "auto") -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_template:
            raise UserError(f"--template chat: tokenizer '{tokenizer.name_or_path}' has no chat template "
                            "(use --template mftcoder)")
        self.mode: Literal["chat", "mftcoder"] = "chat" if template == "chat" or (
            template == "auto" and has_template) else "mftcoder"
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer '{tokenizer.name_or_path}' has no EOS token: cannot close samples")
        self.eos = str(tokenizer.eos_token)
        probe = tokenizer("a")["input_ids"]
        adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
        self.bos = str(tokenizer.bos_token) if adds_bos else ""
        specials = {str(t.content) for t in tokenizer.added_tokens_decoder.values() if t.special}
        specials |= {str(t) for t in tokenizer.all_special_tokens}
        self.specials = sorted(specials, key=len, reverse=True)
        self._shapes: dict[tuple[bool, int], list[str] | None] = {}
        self._plans: dict[tuple[bool, int], _Plan | None] = {}
        self._warned_no_marker = False
        self.fim_tokens = fim.find_tokens(tokenizer)
        self._tool_support: bool | None = None  # probed on the first conversation with tools
        self._marker: str | None = None
        self._marker_probed = False

    # -- public -----------------------------------------------------------------------------------------
    def render(self, sample: Chat | Completion | Text | fim.Fim) -> tuple[str, list[Span]]:
        if isinstance(sample, Chat):
            text, spans = self._render_chat(sample)
            if sample.context_only:
                spans = [span for k, span in enumerate(spans) if k not in sample.context_only]
            return text, spans
        if isinstance(sample, Text):
            text = f"{self.bos}{sample.text}{self.eos}"
            return text, [(len(self.bos), len(text))]
        if isinstance(sample, Completion):
            text = f"{self.bos}{sample.prompt}{sample.completion}{self.eos}"
            return text, [(len(self.bos) + len(sample.prompt), len(text))]
        if self.fim_tokens is None:
            raise UserError(f"tokenizer '{self.tokenizer.name_or_path}' has no FIM special tokens")
        return fim.render(sample, self.fim_tokens, self.bos, self.eos)

    def _render_chat(self, sample: Chat) -> tuple[str, list[Span]]:
        if sample.messages is not None:
            return self._render_tools(sample)
        if self.mode == "mftcoder":
            return self._render_mftcoder(sample)
        shape = (sample.system is not None, len(sample.turns))
        plan = self._plans[shape] if shape in self._plans else self._plan(sample, shape)
        if plan is None:
            return self._render_exact(sample)
        return self._join(sample, plan)

    # -- MFTCoder markers -----------------------------------------------------------------------------------
    def _render_mftcoder(self, chat: Chat) -> tuple[str, list[Span]]:
        # every marker opens with ``<s>``: when that is the tokenizer's BOS the first marker is the BOS
        # (MFTCoder's own layout on Llama-family tokenizers), so none is put before it
        parts = [] if self.bos == MFTCODER_MARKERS["user"][: len(self.bos)] else [self.bos]
        if chat.system is not None:
            parts.append(f"{MFTCODER_MARKERS['system']}{chat.system}\n")
        size = sum(map(len, parts))
        spans: list[Span] = []
        for role, content in chat.turns:
            if role == "user":
                piece = f"{MFTCODER_MARKERS['user']}{content}\n"
            else:
                start = size + len(MFTCODER_MARKERS["assistant"])
                piece = f"{MFTCODER_MARKERS['assistant']}{content}{self.eos}\n"
                spans.append((start, start + len(content) + len(self.eos)))
            parts.append(piece)
            size += len(piece)
        return "".join(parts)[: spans[-1][1]], spans

    # -- chat template, fast path -----------------------------------------------------------------------------
    def _apply(self, messages: list[dict[str, Any]], generation_prompt: bool = False, tools: Any = None) -> str:
        try:
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                                          add_generation_prompt=generation_prompt))
        except Exception as exc:  # noqa: BLE001 - templates raise whatever their author chose
            roles = "/".join(m["role"] for m in messages)
            raise UserError(f"chat template of '{self.tokenizer.name_or_path}' fails on a {roles} conversation: "
                            f"{exc} (try --template mftcoder)") from None

    def _split(self, rendered: str, count: int) -> list[str] | None:
        pieces, pos = [], 0
        for i in range(count):
            marker = _sentinel(i)
            at = rendered.find(marker, pos)
            if at < 0:
                return None
            pieces.append(rendered[pos:at])
            pos = at + len(marker)
        pieces.append(rendered[pos:])
        return pieces

    def _pieces(self, chat: Chat) -> list[str] | None:
        """Literal template text around each content for this conversation shape; None if content-dependent."""
        shape = (chat.system is not None, len(chat.turns))
        if shape not in self._shapes:
            count = int(shape[0]) + shape[1]
            plain = self._split(self._apply(_messages(chat, [_sentinel(i) for i in range(count)])), count)
            if plain is not None and not all(self._verbatim(chat, plain, wrap) for wrap in _PROBE_WRAPS):
                plain = None
            self._shapes[shape] = plain
            if self._shapes[shape] is None:
                log.info("chat template edits message contents; rendering each record exactly (slower)")
        return self._shapes[shape]

    def _verbatim(self, chat: Chat, pieces: list[str], wrap: tuple[str, str]) -> bool:
        """Whether the template writes contents wrapped in ``wrap`` verbatim between the same pieces."""
        before, after = wrap
        contents = [f"{before}{_sentinel(i)}{after}" for i in range(len(pieces) - 1)]
        expected = pieces[0] + "".join(c + p for c, p in zip(contents, pieces[1:]))
        return self._apply(_messages(chat, contents)) == expected

    def _end_marker(self, after: str) -> int | None:
        """Length of the text after an assistant content up to and including its first special token."""
        best: int | None = None
        for token in self.specials:
            at = after.find(token)
            if at >= 0 and (best is None or at + len(token) < best):
                best = at + len(token)
        return best

    def _close(self, after: str) -> tuple[str, int]:
        """(text following the content, loss length into it): inserts EOS when the template writes no marker."""
        end = self._end_marker(after)
        if end is not None:
            return after, end
        if not self._warned_no_marker:
            log.warning("chat template closes assistant turns with no special token; appending EOS %r", self.eos)
            self._warned_no_marker = True
        return self.eos + after, len(self.eos)

    def _plan(self, chat: Chat, shape: tuple[bool, int]) -> _Plan | None:
        """The template text around each content of this shape, assistant turns closed, cut after the last one."""
        pieces = self._pieces(chat)
        plan: _Plan | None = None
        if pieces is not None:
            roles, _ = _roles_contents(chat)
            steps: list[tuple[str, int | None]] = []
            for role, after in zip(roles, pieces[1:]):
                steps.append(self._close(after) if role == "assistant" else (after, None))
            last = max(i for i, (_, loss_len) in enumerate(steps) if loss_len is not None)
            after, loss_len = steps[last]
            plan = (pieces[0], steps[:last] + [(after[:loss_len], loss_len)])
        self._plans[shape] = plan
        return plan

    def _join(self, chat: Chat, plan: _Plan) -> tuple[str, list[Span]]:
        head, steps = plan
        parts = [head]
        size = len(head)
        spans: list[Span] = []
        contents = [c for _, c in chat.turns] if chat.system is None else [chat.system] + [c for _, c in chat.turns]
        for content, (after, loss_len) in zip(contents, steps):
            if loss_len is not None:
                spans.append((size, size + len(content) + loss_len))
            parts.append(content)
            parts.append(after)
            size += len(content) + len(after)
        return "".join(parts), spans

    # -- chat template, exact path -----------------------------------------------------------------------------
    def _render_exact(self, chat: Chat) -> tuple[str, list[Span]]:
        messages = _messages(chat)
        offset = 1 if chat.system is not None else 0
        spans: list[Span] = []
        text = ""
        for i, (role, content) in enumerate(chat.turns):
            if role != "assistant":
                continue
            before = self._apply(messages[: offset + i], generation_prompt=True)
            through = self._apply(messages[: offset + i + 1])
            if not through.startswith(before) or (text and not through.startswith(text)):
                raise UserError(f"chat template of '{self.tokenizer.name_or_path}' renders earlier turns "
                                "differently once later turns are added; use --template mftcoder")
            reply = through[len(before):]
            at = reply.find(content)
            core = content if at >= 0 else content.strip()
            at = reply.find(core) if at < 0 else at
            if at < 0:
                raise UserError(f"chat template of '{self.tokenizer.name_or_path}' does not write assistant "
                                "replies verbatim; use --template mftcoder")
            start = len(before) + at
            after, loss_len = self._close(through[start + len(core):])
            through = through[: start + len(core)] + after
            spans.append((start, start + len(core) + loss_len))
            text = through
        return text[: spans[-1][1]], spans

    # -- chat template, conversations with tool calls ---------------------------------------------------------
    def _supports_tools(self) -> bool:
        """Whether the template writes tool calls (name and arguments) and tool results into the text."""
        if self._tool_support is None:
            name, argument, result = (f"{_OPEN}probe_{what}{_CLOSE}" for what in ("fn", "arg", "result"))
            call = {"type": "function", "function": {"name": name, "arguments": {argument: 1}}}
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "content": result}, {"role": "assistant", "content": "a"}]
            try:
                rendered = str(self.tokenizer.apply_chat_template(probe, tokenize=False))
            except Exception:  # noqa: BLE001 - a template without tool support fails in its own way
                rendered = ""
            self._tool_support = all(part in rendered for part in (name, argument, result))
        return self._tool_support

    def _render_tools(self, chat: Chat) -> tuple[str, list[Span]]:
        """Each assistant turn's span: what the template writes after the generation prompt, to its end marker."""
        if self.mode == "mftcoder" or not self._supports_tools():
            which = "--template mftcoder has no tool format" if self.mode == "mftcoder" else \
                f"the chat template of '{self.tokenizer.name_or_path}' does not render tool calls and tool turns"
            raise BadRecord("tools_unsupported", f"{chat.where}: a conversation with tool calls, but {which}; use "
                                                 "a tokenizer whose template renders them, or --skip-bad")
        messages = list(chat.messages or ())
        tools = list(chat.tools) if chat.tools is not None else None
        spans: list[Span] = []
        text = ""
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._apply(messages[:j], generation_prompt=True, tools=tools)
            through = self._apply(messages[: j + 1], tools=tools)
            if not through.startswith(before) or not before.startswith(text):
                raise UserError(f"chat template of '{self.tokenizer.name_or_path}' renders earlier turns "
                                "differently once later turns are added; cannot find the loss of tool calls")
            reply = through[len(before):]
            marker = self._turn_marker()
            if marker is not None and marker in reply:
                end = reply.rfind(marker) + len(marker)
            else:  # the template closes turns with no special token: EOS goes after the reply
                end = len(reply.rstrip()) + len(self.eos)
                reply = reply.rstrip() + self.eos + reply[len(reply.rstrip()):]
            spans.append((len(before), len(before) + end))
            text = before + reply
        return text[: spans[-1][1]], spans

    def _turn_marker(self) -> str | None:
        """The special token the template writes after an assistant reply (None when it writes none)."""
        if not self._marker_probed:
            self._marker_probed = True
            content = _sentinel(0)
            rendered = self._apply([{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
            after = rendered[rendered.find(content) + len(content):]
            end = self._end_marker(after)
            self._marker = None if end is None else next(t for t in self.specials if after[:end].endswith(t))
        return self._marker
