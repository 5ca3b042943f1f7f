"""Prompts for classification by prompting (icl.py): plain `Field: {text}\\nLabel:` text
derived from the field names (`Sentiment:` for polarity labels) by default, for chat models
too; or through the model's chat template (an instruction naming the labels, demonstrations as
prior user/assistant turns or listed in the example's turn). On IMDB, SmolLM2-135M-Instruct
scored higher with the plain prompt at 0 and at 4 shots than with any chat layout, which fell
apart with demonstrations (docs/BENCHMARKS.md, Prompting), hence plain for `auto`.

A prompt is its format, its template (pre- and post-modifiers around `{text}`), an instruction
and the words that stand for the labels; `describe()` is what results record as "prompt".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import ConfigError, DataError, closest

FORMATS = ("auto", "chat", "plain")
LAYOUTS = ("auto", "turns", "inline")  # where a chat prompt's demonstrations go
SPEC_KEYS = ("format", "template", "pre", "post", "instruction", "label_words", "layout")
# Field names that say nothing about the task: the instruction leaves them out.
GENERIC = {
    "text",
    "label",
    "label_name",
    "labels",
    "class",
    "target",
    "y",
    "x",
    "input",
    "output",
    "sentence",
    "content",
}
POLARITY = {"negative", "positive", "neutral", "mixed"}


@dataclass
class PromptSpec:
    """What the user asked for; None fields are derived from the model and the field names."""

    format: str = "auto"  # auto: plain (measured better than chat for an instruct model)
    template: str | None = None  # the example around {text}, e.g. "Review: {text}\nSentiment:"
    instruction: str | None = None  # "" for none
    label_words: list[str] | None = None  # one word per label, in label order
    layout: str = "auto"  # turns: prior user/assistant turns; inline: listed in the user turn

    @classmethod
    def from_dict(cls, options: dict, where: str = "prompt") -> PromptSpec:
        """From a recipe's keys: format, template or pre/post, instruction, label_words."""
        for key in options:
            if key not in SPEC_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}{closest(key, SPEC_KEYS)}")
        template = options.get("template")
        if "pre" in options or "post" in options:
            if template is not None:
                raise ConfigError(f"{where}: give template or pre/post, not both")
            template = f"{options.get('pre', '')}{{text}}{options.get('post', '')}"
        words = options.get("label_words")
        if isinstance(words, str):
            words = words.split(",")
        return cls(
            format=options.get("format", "auto"),
            template=template,
            instruction=options.get("instruction"),
            label_words=[str(w).strip() for w in words] if words else None,
            layout=options.get("layout", "auto"),
        )


def _noun(name: str) -> str:
    return name.replace("_", " ").replace("-", " ").strip()


def default_instruction(words: list[str], text_field: str, label_field: str) -> str:
    """'Classify the sentiment of the review as negative or positive. Answer with one word.'
    A generic label field is named by its labels where they are polarities (sentiment)."""
    if label_field.lower() not in GENERIC:
        what = f"the {_noun(label_field)} of "
    elif {w.lower() for w in words} <= POLARITY:
        what = "the sentiment of "
    else:
        what = ""
    text = "text" if text_field.lower() in GENERIC else _noun(text_field)
    choices = ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]
    return f"Classify {what}the {text} as {choices}. Answer with one word."


def default_template(chat: bool, text_field: str, label_field: str, words: list[str]) -> str:
    """'Review: {text}' in a chat turn; 'Review: {text}\\nSentiment:' as plain text. A generic
    label field is 'Sentiment' where the labels are polarities, as in the instruction: with
    'Label:' SmolLM2 was at chance on IMDB (issue 21), with 'Sentiment:' at 78% (0 shots)."""
    text = _noun(text_field).capitalize() or "Text"
    if label_field.lower() not in GENERIC:
        label = _noun(label_field).capitalize()
    else:
        label = "Sentiment" if {w.lower() for w in words} <= POLARITY else "Label"
    return f"{text}: {{text}}" if chat else f"{text}: {{text}}\n{label}:"


@dataclass
class Prompt:
    """A resolved prompt: renders demonstrations and an example into the model's input text."""

    format: str  # chat or plain
    template: str
    instruction: str
    words: list[str]
    chat: object = field(default=None, repr=False)  # the tokenizer, for its chat template
    system: bool = True  # the instruction as a system turn (else at the top of each user turn)
    layout: str = "turns"

    def fill(self, text: str) -> str:
        """The template around text; the instruction goes where {instruction} stands."""
        return self.template.replace("{instruction}", self.instruction).replace("{text}", text)

    def space(self) -> str:
        """What comes between a plain prompt and its label word (none after whitespace)."""
        return "" if self.format == "chat" or self.template[-1:].isspace() else " "

    def head(self) -> str:
        """The instruction before a plain example, unless the template places it."""
        placed = "{instruction}" in self.template
        return f"{self.instruction}\n\n" if self.instruction and not placed else ""

    def _messages(self, demos: list[tuple[str, int]], text: str) -> list[dict]:
        """The instruction as the system turn (where the template does not place it), then each
        demonstration as a user turn and an assistant turn with its label word (turns), or all
        of them listed in the example's user turn before it (inline), then the example."""
        system = self.system and self.instruction and "{instruction}" not in self.template
        out = [{"role": "system", "content": self.instruction}] if system else []
        head = "" if system else self.head()
        if self.layout == "inline":
            shown = "".join(f"{self.fill(t)}\nAnswer: {self.words[y]}\n\n" for t, y in demos)
            return out + [{"role": "user", "content": head + shown + self.fill(text)}]
        for demo_text, label in demos:
            out += [
                {"role": "user", "content": head + self.fill(demo_text)},
                {"role": "assistant", "content": self.words[label]},
            ]
        return out + [{"role": "user", "content": head + self.fill(text)}]

    def render(self, demos: list[tuple[str, int]], text: str) -> str:
        """The whole input for one example; the label word is its continuation."""
        if self.format == "chat":
            return self.chat.render_chat(self._messages(demos, text), True)
        return (
            self.head()
            + "".join(f"{self.fill(t)}{self.space()}{self.words[y]}\n\n" for t, y in demos)
            + self.fill(text)
        )

    def describe(self) -> dict:
        """What results record: format, instruction, template, words and a 0-shot example."""
        out = {
            "format": self.format,
            "instruction": self.instruction,
            "template": self.template,
            "label_words": self.words,
            "example": self.render([], "{text}"),
        }
        return {**out, "layout": self.layout} if self.format == "chat" else out


def resolve_prompt(
    spec: PromptSpec | None,
    tokenizer,
    labels: list[str],
    text_field: str = "text",
    label_field: str = "label",
) -> Prompt:
    """The prompt a spec means for this tokenizer and these labels; bad specs are one-line errors."""
    spec = spec or PromptSpec()
    if spec.format not in FORMATS:
        raise ConfigError(
            f"prompt format {spec.format!r}: expected one of {', '.join(FORMATS)}"
            f"{closest(spec.format, FORMATS)}"
        )
    if spec.layout not in LAYOUTS:
        raise ConfigError(
            f"prompt layout {spec.layout!r}: expected one of {', '.join(LAYOUTS)}"
            f"{closest(spec.layout, LAYOUTS)}"
        )
    chat = spec.format == "chat"
    words = spec.label_words or list(labels)
    if len(words) != len(labels):
        raise ConfigError(
            f"label words {words}: expected one per label ({len(labels)}: {', '.join(labels)})"
        )
    if len({w.strip().lower() for w in words}) != len(words) or not all(w.strip() for w in words):
        raise ConfigError(f"label words {words}: each must be non-empty and different")
    template = (
        spec.template
        if spec.template is not None
        else default_template(chat, text_field, label_field, words)
    )
    if template.count("{text}") != 1:
        raise ConfigError(f"template {template!r}: must hold {{text}} exactly once")
    if spec.instruction is not None:
        instruction = spec.instruction
    else:  # an instruction in chat turns; plain text scored lower with one (65-66% on IMDB)
        instruction = default_instruction(words, text_field, label_field) if chat else ""
    prompt = Prompt(
        "chat" if chat else "plain",
        template,
        instruction,
        words,
        tokenizer if chat else None,
        layout=spec.layout if spec.layout != "auto" else "turns",
    )
    if chat and instruction:
        try:  # some chat templates (Gemma's) refuse a system turn
            prompt.render([], "x")
        except DataError:
            prompt.system = False
    return prompt
