"""Preference pairs (for DPO): a prompt, the preferred answer and the rejected one.

A record is ``{"prompt": "...", "chosen": "...", "rejected": "..."}``, or the chat form
(TRL's conversational form): ``prompt`` a list of messages (system/user/assistant, ending with
a user message) and ``chosen`` / ``rejected`` each an assistant message, a list of one, or text.
CSV, TSV and Parquet rows use the columns ``prompt`` (or prompt-column), ``chosen`` and
``rejected``. A pair becomes an :class:`Example` whose last assistant turn is the chosen answer
and whose ``rejected`` holds the other. The functions are pure: a record goes in, an example or
a :class:`Problem` naming what is wrong and what to do comes out.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.data.records import Example, Problem, chat_example, json_type

CHOSEN, REJECTED = "chosen", "rejected"


def is_preference(record: Mapping[str, object]) -> bool:
    """Whether a record (or a header's columns) has a preference field."""
    return CHOSEN in record or REJECTED in record


def preference_example(
    record: Mapping[str, object], where: str, prompt: str = "prompt", system: str = ""
) -> Example | Problem:
    """A preference pair from a record, or what is wrong with it. A chat under ``messages``
    ending with the chosen answer, plus ``rejected``, reads too (simulations' partitions)."""
    messages = record.get("messages")
    if prompt not in record and CHOSEN not in record and isinstance(messages, list) and messages:
        record = {**record, prompt: messages[:-1], CHOSEN: messages[-1]}
    for key in (prompt, CHOSEN, REJECTED):
        if key not in record:
            have = ", ".join(list(record)[:8]) + (", ..." if len(record) > 8 else "")
            return Problem(
                where,
                f"missing field '{key}' (the record has: {have or 'nothing'}): a preference "
                f"pair needs '{prompt}', '{CHOSEN}' and '{REJECTED}'",
            )
    answers = []
    for key in (CHOSEN, REJECTED):
        answer, problem = _answer(record[key], key)
        if problem:
            return Problem(where, problem)
        answers.append(answer)
    chosen, rejected = answers
    if chosen.strip() == rejected.strip():
        return Problem(
            where,
            f"'{CHOSEN}' and '{REJECTED}' are the same answer: nothing to prefer; "
            "change one or delete the record",
        )
    messages = _prompt_messages(record[prompt], prompt, record.get(system) if system else None)
    if isinstance(messages, str):
        return Problem(where, messages)
    example = chat_example([*messages, {"role": "assistant", "content": chosen}], where)
    if isinstance(example, Problem):
        return Problem(where, f"'{prompt}': {example.message}")
    return Example(source=where, turns=example.turns, rejected=rejected)


def _answer(value: object, key: str) -> tuple[str, str]:
    """The answer's text, and what is wrong with it ('' when nothing)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or "content" not in value:
            return "", (
                f"'{key}' is not an assistant message: write it as text or "
                '[{"role": "assistant", "content": "..."}]'
            )
        value = value["content"]
    if not isinstance(value, str):
        return "", (
            f"'{key}' is {json_type(value)}, not text: write it as a string or "
            '[{"role": "assistant", "content": "..."}]'
        )
    if not value.strip():
        return "", f"'{key}' is empty: fill it in or delete the record"
    return value, ""


def _prompt_messages(value: object, key: str, system: object) -> list[object] | str:
    """The prompt as chat messages, or what is wrong with it."""
    if isinstance(value, list):
        if value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            return f"'{key}' ends with an assistant message: end it with the user's message"
        return list(value)
    if not isinstance(value, str):
        return f"'{key}' is {json_type(value)}, not text or a list of messages: write it as one"
    if not value.strip():
        return f"'{key}' is empty: fill it in or delete the record"
    messages: list[object] = [{"role": "user", "content": value}]
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages
