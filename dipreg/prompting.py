"""How a minimal-pair context is shown to the model: as raw text, or inside the model's chat template.

Stimuli are written as plain text ending in an answer cue ("... ? Answer (Yes or No):"). Instruct models read
them far better as a chat turn: the question becomes the user message and the assistant turn opens with
the cue, so the next token is the answer (candidates keep their leading space). Only the formatting lives
here; the contexts themselves are never changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

PromptStyle = Literal["auto", "raw", "chat"]
PROMPT_STYLES: tuple[str, ...] = ("auto", "raw", "chat")

# The trailing answer cue: text after the last sentence end ("?", "." or newline) that starts with "Answer".
_CUE = re.compile(r"^(?P<question>.*[?.\n])\s*(?P<cue>Answer\b[^?.\n]*)$", re.DOTALL)


@dataclass(frozen=True)
class PromptFormat:
    """Turns a context into the exact string the model reads.

    Args:
        style: ``"raw"`` (the context as is), ``"chat"`` (the tokenizer's chat template, question as the user
            turn, ``answer_prefix`` opening the assistant turn) or ``"auto"`` (chat when the tokenizer has a
            chat template, else raw).
        answer_prefix: the text that opens the assistant turn in chat style.
    """

    style: PromptStyle = "auto"
    answer_prefix: str = "Answer:"

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"Unknown prompt style {self.style!r}; choose one of: {', '.join(PROMPT_STYLES)}.")

    def resolved(self, tokenizer: Any) -> str:
        """The concrete style (``"raw"`` or ``"chat"``) for this tokenizer."""
        if self.style == "auto":
            return "chat" if getattr(tokenizer, "chat_template", None) else "raw"
        if self.style == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'chat' needs a tokenizer with a chat template; use 'raw' or 'auto'.")
        return self.style

    def render(self, context: str, tokenizer: Any) -> str:
        """The string the model reads for ``context``."""
        if self.resolved(tokenizer) == "raw":
            return context
        match = _CUE.match(context.strip())
        question = match.group("question").strip() if match else context.strip()
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return chat + self.answer_prefix

    def add_special_tokens(self, tokenizer: Any) -> bool:
        """Raw contexts get the tokenizer's usual special tokens; a chat template already holds them."""
        return self.resolved(tokenizer) == "raw"
