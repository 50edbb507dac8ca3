"""Load a VLM folder's processor, with the folder's own options and without torchvision if need be.

`AutoProcessor.from_pretrained(folder, **options)` is the normal path; options such as Qwen2-VL's
`max_pixels` are passed through to the image processor, as the model cards show. Processors that
also handle video (Qwen2-VL, Qwen2.5-VL, ...) need transformers' torchvision-backed video
processor even for still images; when torchvision is missing, the same processor class is built
from the folder's image processor, tokenizer and chat template with no video processor. Images
take the same path through it either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CONFIG_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def load_processor(folder: str | Path, trust_remote_code: bool = False, **options: Any):
    """The folder's processor (AutoProcessor), image-only when its video part needs torchvision."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code, **options
        )
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        return image_only_processor(Path(folder), **options)


def processor_class_name(folder: Path) -> str | None:
    for name in CONFIG_FILES:
        path = folder / name
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return None


def chat_template(folder: Path) -> str | None:
    for name in CHAT_TEMPLATE_FILES:
        path = folder / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def image_only_processor(folder: Path, **options: Any):
    """The folder's processor class with its image processor and tokenizer, and no video processor."""
    import transformers

    name = processor_class_name(folder)
    base = getattr(transformers, name, None) if name else None
    if base is None:
        raise ValueError(
            f"{folder}: its processor needs torchvision (video support) and names no transformers "
            "processor class to build an image-only one from; install torchvision"
        )

    class ImageOnly(base):  # the base's own __init__ and __call__, with video_processor=None
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(folder), **options)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return ImageOnly(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template(folder) or getattr(tokenizer, "chat_template", None),
    )
