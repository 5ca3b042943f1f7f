"""HH-RLHF transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') as prompts, responses and messages.

Anthropic's convention: the prompt is everything up to the last '\\n\\nAssistant:', the response
is what follows it. Only the final assistant turn differs between a pair's two transcripts.
"""

from __future__ import annotations

import re

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"(?:\A|\n\n)(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def is_transcript(text) -> bool:
    """Whether text is an HH dialogue: it opens with a Human turn and has an Assistant turn."""
    return isinstance(text, str) and text.lstrip("\n").startswith("Human:") and ASSISTANT in text


def split_transcript(text: str) -> tuple[str, str]:
    """(prompt, response): the prompt ends with the last '\\n\\nAssistant:', as HH-RLHF splits."""
    head, marker, response = text.rpartition(ASSISTANT)
    return head + marker, response


def transcript_messages(prompt: str) -> list[dict]:
    """A prompt from split_transcript as chat messages (user/assistant, content stripped).

    The trailing empty Assistant turn is the one the response fills, so it is left out; turns
    of one role in a row (a few HH dialogues have two Assistant turns running) are joined, as
    chat templates that require alternating roles would reject them.
    """
    parts = _TURN.split(prompt.removesuffix(ASSISTANT))
    messages: list[dict] = []
    for name, content in zip(parts[1::2], parts[2::2]):
        role, content = ROLES[name], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages
