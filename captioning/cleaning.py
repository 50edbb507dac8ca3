"""Turn a VLM's raw answer into a training caption: strip boilerplate, tidy, fit a token budget.

VLMs open with phrases that describe the act of looking ("The image shows", "In this
picture,") rather than the content; a text-to-image model trained on them learns to expect
them in every prompt. We drop such openings, collapse whitespace and markup, and cut the
caption to the token budget of the text encoder used later (T5, 77 tokens in SD3's training),
at the last sentence end that fits, else the last whole word.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_SUBJECT = r"(?:the|this|that|an?)\s+(?:image|picture|photo|photograph|painting|illustration|scene|drawing|artwork|frame|shot)"
_VERB = r"(?:shows|depicts|features|displays|presents|captures|portrays|showcases|illustrates|contains|is of|is)"
BOILERPLATE = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"^(?:caption|description)\s*:\s*",
        rf"^(?:here\s+is|this\s+is|it\s+is)\s+(?:a\s+)?(?:detailed\s+)?(?:description|caption)\s+of\s+{_SUBJECT}\s*[:,.]?\s*",
        rf"^(?:in|within)\s+{_SUBJECT}\s*,?\s*(?:we\s+(?:can\s+)?see|there\s+(?:is|are)\s+)?\s*",
        rf"^{_SUBJECT}\s+{_VERB}\s+(?:an?\s+(?:image|picture|photo|photograph)\s+of\s+)?",
        r"^(?:this|it)\s+is\s+(?:an?\s+)?(?:image|picture|photo|photograph)\s+(?:of|showing)\s+",
        r"^(?:we\s+can\s+see|i\s+(?:can\s+)?see)\s+",
    )
]
_MARKUP = re.compile(r"[*_`#]+")
_SPACE = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def clean_caption(text: str) -> str:
    """Boilerplate openings, markup and stray whitespace removed; first letter upper-cased."""
    text = _SPACE.sub(" ", _MARKUP.sub("", text)).strip().strip("\"'").strip()
    changed = True
    while changed and text:
        changed = False
        for pattern in BOILERPLATE:
            stripped = pattern.sub("", text, count=1)
            if stripped != text:
                text, changed = stripped.lstrip(" ,:;-"), True
    return text[:1].upper() + text[1:] if text else text


@dataclass
class TokenBudget:
    """Counts tokens the way the text encoder will, and fits captions to `max_tokens`.

    `count` includes the special tokens the encoder's tokenizer adds (T5 appends `</s>`), so a
    caption within budget is never cut by `max_length=max_tokens` later.
    """

    max_tokens: int
    count: Callable[[str], int]
    name: str = "words"

    def fit(self, text: str) -> tuple[str, bool]:
        """(caption within budget, whether it was cut)."""
        if self.count(text) <= self.max_tokens:
            return text, False
        words = text.split(" ")
        low, high = 0, len(words)  # largest prefix of whole words that fits
        while low < high:
            middle = (low + high + 1) // 2
            if self.count(" ".join(words[:middle])) <= self.max_tokens:
                low = middle
            else:
                high = middle - 1
        prefix = " ".join(words[:low])
        ends = [m.end() for m in _SENTENCE_END.finditer(prefix)]
        if ends and ends[-1] >= len(prefix) // 2:  # keep whole sentences unless that loses half
            prefix = prefix[: ends[-1]]
        return prefix.rstrip(" ,;:-"), True


def word_budget(max_tokens: int) -> TokenBudget:
    return TokenBudget(max_tokens, lambda text: len(text.split()), "words")


def tokenizer_budget(max_tokens: int, folder: str) -> TokenBudget:
    """A budget counted by the tokenizer in FOLDER, or in FOLDER/tokenizer_3 (an SD3 folder's T5)."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if (path / "tokenizer_3").is_dir():
        path = path / "tokenizer_3"
    if not path.is_dir():
        raise FileNotFoundError(f"budget tokenizer folder {folder} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} holds no tokenizer that transformers can load ({error}); point "
            "--budget-tokenizer at a tokenizer folder or an SD3 model folder"
        ) from None
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[
        :12
    ]
    return TokenBudget(
        max_tokens,
        lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]),
        f"{type(tokenizer).__name__}:{len(tokenizer)}:{vocab}",  # the same tokenizer anywhere on disk
    )


def make_budget(max_tokens: int, folder: str | None) -> TokenBudget:
    return word_budget(max_tokens) if folder is None else tokenizer_budget(max_tokens, folder)
