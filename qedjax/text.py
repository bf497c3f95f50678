"""Small text helpers shared by graders, the RC loop and evaluation: the thinking block.

Thinking models write `<think> ... </think>` and then the answer. Engines put the opening tag into
`Completion.text` when the chat template already opened it in the prompt, so a completion's text is
self-describing: `</think>` present means the thinking ended; `<think>` without `</think>` means the
response was cut off (or the model never stopped thinking).
"""

from __future__ import annotations

import dataclasses

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclasses.dataclass(frozen=True)
class Split:
    thinking: str  # the text inside the think block ("" if there is none)
    answer: str  # what follows </think> (or the whole text when there is no think block)
    closed: bool  # False when a think block was opened and never closed


def split_thinking(text: str) -> Split:
    """Splits a response into its thinking part and its answer.

    The last `</think>` ends the thinking (a model may mention the tag inside its reasoning).
    """
    end = text.rfind(THINK_CLOSE)
    if end >= 0:
        thinking = text[:end]
        start = thinking.find(THINK_OPEN)
        if start >= 0:
            thinking = thinking[start + len(THINK_OPEN) :]
        return Split(thinking.strip(), text[end + len(THINK_CLOSE) :].strip(), True)
    start = text.find(THINK_OPEN)
    if start >= 0:
        return Split(text[start + len(THINK_OPEN) :].strip(), "", False)
    return Split("", text.strip(), True)
