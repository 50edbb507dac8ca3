"""Captioning prompts: what the VLM is asked for each image.

Two built-ins: a plain detailed-description prompt, and a PixArt-style prompt that passes the
original (alt-text) caption as a hint, which keeps proper nouns and facts the pixels alone do
not show (PixArt-Sigma, Sec. 3; SD3 recaptions with CogVLM, Sec. 5.2.2). A template is plain
text in which `{caption}` stands for the row's original caption; use `{{` and `}}` for
literal braces. Florence-2 is prompted with task tokens instead (`<MORE_DETAILED_CAPTION>`), which
are built-in prompts too.
"""

from __future__ import annotations

import string
from pathlib import Path

from captioning.config import TASK_TOKENS

BUILTIN_PROMPTS: dict[str, str] = {
    "detailed": (
        "Describe this image in detail in one paragraph: the main subject, what it is doing, "
        "its colours and textures, the setting and the composition."
    ),
    "hint": (
        "Describe this image and its style in a very detailed manner, in one paragraph. "
        'Its original caption, which may be incomplete or inaccurate, is: "{caption}". '
        "Keep names and facts from the original caption only where the image agrees with them."
    ),
}
# Florence-2 task tokens are prompts of their own: the processor turns each into its question.
BUILTIN_PROMPTS.update({token: token for token in TASK_TOKENS})
FIELDS = {"caption"}


def load_template(prompt: str = "detailed", prompt_file: str | None = None) -> str:
    """The template text: PROMPT_FILE's content if given, else the built-in named PROMPT."""
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist")
        template = path.read_text(encoding="utf-8").strip()
        if not template:
            raise ValueError(f"prompt file {path} is empty; write the question for the VLM in it")
        source = str(path)
    else:
        if prompt not in BUILTIN_PROMPTS:
            raise ValueError(f"unknown prompt {prompt!r}; choose one of {sorted(BUILTIN_PROMPTS)}")
        template, source = BUILTIN_PROMPTS[prompt], f"built-in prompt {prompt!r}"
    _check_fields(template, source)
    return template


def _check_fields(template: str, source: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(
            f"{source}: not a valid template ({error}); write literal braces as {{{{ }}}}"
        ) from None
    unknown = fields - FIELDS
    if unknown:
        raise ValueError(
            f"{source}: unknown placeholder(s) {sorted(unknown)}; the only one is {{caption}} "
            "(write literal braces as {{ }})"
        )


def render(template: str, caption: str | None) -> str:
    """The prompt for one row; a missing original caption becomes an empty hint."""
    return template.format(caption=(caption or "").strip())
