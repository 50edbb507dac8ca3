"""Captioning backends: what turns (image, prompt) requests into raw answers.

`transformers` runs a local VLM folder in this process, in batches; `openai` sends each request
to an OpenAI-compatible chat-completions server (captioning/openai_client.py). A backend answers
every request, with text or with the reason it failed; one bad row never sinks its batch.
What a backend is asked and answers is captioning/protocol.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from captioning.config import CaptionConfig
from captioning.openai_client import OpenAIBackend
from captioning.prompts import load_template
from captioning.protocol import Answer, Backend, Progress, Request, settings_from
from captioning.vlm import LocalVLM, batch_seed


def model_identity(config: CaptionConfig) -> dict[str, str]:
    """What names the model in the captioner id: a served name, or a local folder's content.

    A folder is identified by its config.json and the names and sizes of its files (cheap for
    multi-GB weights, and unchanged by copying the folder elsewhere).
    """
    if config.backend == "openai":
        return {"name": config.model}
    folder = Path(config.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a transformers model folder (no config.json); pass a local VLM "
            "folder, e.g. one written by `t2i init-captioner`"
        )
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{file.stat().st_size}\n".encode())
    return {"name": folder.resolve().name, "content": digest.hexdigest()[:16]}


class TransformersBackend:
    """A local VLM, fed `batch_size` requests per generate() call."""

    def __init__(self, config: CaptionConfig) -> None:
        self.vlm = LocalVLM(
            config.model,
            config.device,
            config.dtype,
            config.trust_remote_code,
            config.model_class,
            config.processor_kwargs,
        )
        self.vlm.check_prompt(
            load_template(config.prompt, config.prompt_file), config.system_prompt
        )
        self.system_prompt = config.system_prompt
        self.settings = settings_from(config)
        self.batch_size = config.batch_size

    def caption(self, requests: list[Request], progress: Progress) -> list[Answer]:
        answers: list[Answer] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            answers.extend(self._batch(batch))
            progress(len(batch))
        return answers

    def _batch(self, batch: list[Request]) -> list[Answer]:
        try:
            texts = self.vlm.generate(
                [r.image for r in batch],
                [r.prompt for r in batch],
                self.settings,
                seed=batch_seed(self.settings.seed, [r.key for r in batch]),
                system_prompt=self.system_prompt,
            )
            return [Answer(text=t) for t in texts]
        except Exception as error:  # isolate the row that broke the batch
            if len(batch) == 1:
                return [Answer(error=f"generation failed: {type(error).__name__}: {error}")]
            return [a for r in batch for a in self._batch([r])]

    def close(self) -> None:
        pass


def make_backend(config: CaptionConfig) -> Backend:
    if config.backend == "openai":
        return OpenAIBackend(config)
    return TransformersBackend(config)
