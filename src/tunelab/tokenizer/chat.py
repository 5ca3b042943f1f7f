"""Chat templates: the Jinja template stored with a model, rendered as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunelab.errors import DataError

# Used when a model ships no template (e.g. a from-scratch GPT): ChatML, widely understood.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Templates come from model files: run them sandboxed, with the globals HF templates expect.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = True, **special_tokens
) -> str:
    """The prompt text for a conversation; special_tokens gives bos_token, eos_token, ..."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"message {i}: expected {{'role': ..., 'content': ...}}, got {message!r}"
            )
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except jinja2.TemplateError as e:
        raise DataError(f"chat template failed: {e}") from None
