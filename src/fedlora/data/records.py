"""Training examples, and the checks that turn one parsed record into an example or a problem.

An :class:`Example` is either a chat (turns; the loss covers the assistant turns) or plain text
(continued pre-training; the loss covers every token). The functions here are pure: a record
(a JSON value, or a CSV row as a mapping) goes in, an ``Example`` or a :class:`Problem` that says
what is wrong and what to do comes out. The readers in :mod:`fedlora.data.readers` call them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn role {self.role!r}: use one of {ROLES}")


@dataclass(frozen=True)
class Example:
    source: str  # "path/to/file.jsonl:12": where the record starts (csv: file line, header = 1)
    turns: tuple[Turn, ...] = ()  # a chat: >= 1 assistant turn, and the last turn is one
    text: str = ""  # plain text (continued pre-training)
    # the record's other scalar fields as text (JSON keys, CSV columns), for partitioning by a
    # column in simulation; never sent anywhere
    fields: tuple[tuple[str, str], ...] = ()
    # a preference pair (fedlora.data.preference): the rejected answer; the last turn is chosen
    rejected: str = ""

    def __post_init__(self) -> None:
        if bool(self.turns) == bool(self.text):
            raise ValueError(f"Example {self.source}: give either turns or text, not both/neither")
        if self.rejected and not self.turns:
            raise ValueError(f"Example {self.source}: a rejected answer needs a chat")

    @property
    def kind(self) -> str:
        """'chat' (loss on the assistant turns), 'text' (loss on all tokens) or 'preference'
        (a chat whose last answer is preferred to ``rejected``: DPO)."""
        if self.rejected:
            return "preference"
        return "chat" if self.turns else "text"


class Problem(NamedTuple):
    """A record (or a whole file) that cannot be used."""

    where: str  # "file:line", or "file" for a problem with the whole file
    message: str  # "what is wrong: what to do"
    droppable: bool = True  # a bad record (on-bad-record=skip drops it), not a file-level problem

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def scalar_fields(record: Mapping[str, object], used: set[str]) -> tuple[tuple[str, str], ...]:
    """The record's scalar fields (text, numbers, true/false) other than ``used``, as text."""
    return tuple(
        (str(key), str(value))
        for key, value in record.items()
        if key not in used and isinstance(value, str | int | float | bool)
    )


def json_type(value: object) -> str:
    """How a JSON value's type reads in a message: 'a number', 'a list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def chat_example(messages: object, where: str) -> Example | Problem:
    """An example from an OpenAI/Hugging Face style ``messages`` list, or what is wrong with it."""
    if not isinstance(messages, list):
        return Problem(
            where,
            f"'messages' is {json_type(messages)}, not a list: write "
            '"messages": [{"role": "user", "content": "..."}, ...]',
        )
    if not messages:
        return Problem(where, "'messages' is empty: add the conversation or delete the line")
    turns = []
    for i, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict):
            return Problem(
                where,
                f"message {i} is {json_type(msg)}, not an object: write it as "
                '{"role": "...", "content": "..."}',
            )
        for key in ("role", "content"):
            if key not in msg:
                return Problem(where, f"message {i} has no '{key}': add it")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            return Problem(where, f"message {i} has role {role!r}: use system, user or assistant")
        if role == "system" and i > 1:
            return Problem(
                where,
                f"message {i} is a system message: only the first message "
                "may be one; merge it into the first or drop it",
            )
        if not isinstance(content, str):
            return Problem(
                where,
                f"message {i} content is {json_type(content)}, not text: "
                "write the content as one string",
            )
        if not content.strip():
            return Problem(where, f"message {i} content is empty: fill it in or delete the message")
        turns.append(Turn(role, content))
    if turns[-1].role != "assistant":
        return Problem(
            where,
            "the conversation does not end with an assistant message: nothing "
            "to learn from it; end it with the assistant's reply",
        )
    return Example(source=where, turns=tuple(turns))


def column_example(
    record: Mapping[str, object],
    where: str,
    *,
    prompt: str,
    response: str,
    system: str = "",
    text: str = "",
) -> Example | Problem:
    """An example from named fields: prompt/response (+ system), or ``text`` when it is set.

    A missing or empty system field means no system turn; every other field must hold text.
    """
    wanted = (
        [(text, "text-column", "the text")]
        if text
        else [(prompt, "prompt-column", "the prompt"), (response, "response-column", "the answer")]
    )
    values = []
    for column, setting, what in wanted:
        if column not in record:
            have = ", ".join(list(record)[:8]) + (", ..." if len(record) > 8 else "")
            return Problem(
                where,
                f"missing field '{column}' (the record has: {have or 'nothing'})"
                f": add it, or set {setting} to the column that holds {what}",
            )
        if bad := _not_text(record[column], column):
            return Problem(where, bad)
        values.append(str(record[column]))
    if text:
        return Example(source=where, text=values[0])
    turns = [Turn("user", values[0]), Turn("assistant", values[1])]
    blank = record.get(system) is None or str(record.get(system)).strip() == ""
    if system and not blank:
        if bad := _not_text(record[system], system):
            return Problem(where, bad)
        turns.insert(0, Turn("system", str(record[system])))
    return Example(source=where, turns=tuple(turns))


def _not_text(value: object, column: str) -> str:
    """What is wrong with a field that should hold text ('' if nothing)."""
    if not isinstance(value, str):
        return f"'{column}' is {json_type(value)}, not text: write it as a string"
    if not value.strip():
        return f"'{column}' is empty: fill it in or delete the record"
    return ""
