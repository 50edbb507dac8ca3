"""Options of the captioning package's commands (the CLI, Prefect forms and manifests share them).

Kept free of heavy imports (torch, transformers) so that `t2i --help` stays fast.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from curate.runtime.executor import ExecutorOptions
from curate.runtime.options import device_option

# Florence-2's captioning task tokens: its processor expands each into the question it was trained on.
TASK_TOKENS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
PROCESSOR_KWARGS_HELP = (
    "JSON object of processor options passed to AutoProcessor.from_pretrained, e.g. "
    "'{\"max_pixels\": 200704}' for Qwen2-VL (backend transformers; a server sets its own)"
)


def parse_json_object(value: Any) -> Any:
    """A JSON object given as text (the command line) becomes a dict; anything else is left as is."""
    if not isinstance(value, str):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg}): {value!r}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f'expected a JSON object such as {{"max_pixels": 200704}}, got {value!r}')
    return parsed


# SD3 trained with T5 sequences of 77 tokens (paper Sec. 5.3.2 / Table 7), so a synthetic
# caption longer than that is cut by the text encoder anyway; we cut it first, at a sentence
# or word boundary, so the model never sees half a word.
T5_TRAINING_LENGTH = 77


class CaptionConfig(ExecutorOptions):
    # `t2i caption`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "recaption a curated store with a VLM (local model or OpenAI-compatible server)"
    )
    description: ClassVar[str] = (
        "Reads INPUT (a finished stage output with id and image columns, e.g. `t2i curate` "
        "output) and writes OUTPUT: every row, all columns kept, plus caption_synthetic (the "
        "VLM's caption with boilerplate openings removed, cut to --max-caption-tokens, default "
        "77 = the T5 length SD3 trained with) and captioner (model@hash of model, prompt and "
        "decoding settings). Backend transformers runs a local image-text-to-text folder "
        "(AutoProcessor + AutoModelForImageTextToText); backend openai posts each image to an "
        "OpenAI-compatible chat-completions server (vLLM, SGLang, `t2i serve-captioner`) with "
        "bounded concurrency and retries on 429/5xx; the API key comes from --api-key-env. "
        "Failed rows are kept with null captions and listed in OUTPUT/report.md. Work is saved "
        "in chunks: rerunning after a kill continues where it stopped."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input", "curated store to caption"),
        ("output", "directory to write"),
    )

    backend: Literal["transformers", "openai"] = Field(
        "transformers",
        description="'transformers': a local image-text-to-text model folder; 'openai': an "
        "OpenAI-compatible chat-completions server (vLLM, SGLang, `t2i serve-captioner`)",
    )
    model: str = Field(
        ...,
        description="local model folder (backend transformers) or the model name the server "
        "serves (backend openai)",
    )
    endpoint: str | None = Field(
        None, description="server base URL for backend openai, e.g. http://127.0.0.1:8000/v1"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="environment variable holding the server's API key (the key itself is "
        "never logged or recorded; unset = no key)",
    )
    concurrency: int = Field(8, ge=1, description="requests in flight at once (backend openai)")
    max_retries: int = Field(
        5, ge=0, description="retries of a request answered 429 or 5xx, or cut off (backend openai)"
    )
    retry_backoff_s: float = Field(
        1.0,
        ge=0.0,
        description="first retry delay in seconds; doubles on each retry (backend openai)",
    )
    timeout_s: float = Field(
        120.0, gt=0, description="seconds to wait for one response (backend openai)"
    )
    request_deadline_s: float = Field(
        300.0,
        gt=0,
        description="most seconds one request may take in all, however slowly the server "
        "sends (backend openai); a row that misses it fails with that reason, unretried",
    )
    max_response_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="largest answer read from the server (bytes, backend openai); a larger one "
        "fails its row unread past the limit",
    )
    prompt: Literal[
        "detailed", "hint", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"
    ] = Field(
        "detailed",
        description="'detailed': a plain detailed-description prompt; 'hint': PixArt-style, "
        "passes the original caption as a hint; <CAPTION>, <DETAILED_CAPTION>, "
        "<MORE_DETAILED_CAPTION>: Florence-2 task tokens (Florence-2 models only)",
    )
    system_prompt: str | None = Field(
        None,
        description="system message sent before the prompt (models with a chat template, "
        "e.g. Qwen2-VL; and servers)",
    )
    processor_kwargs: dict[str, Any] = Field(
        default_factory=dict, description=PROCESSOR_KWARGS_HELP
    )
    prompt_file: str | None = Field(
        None,
        description="text file with your own prompt template (overrides --prompt); "
        "{caption} is replaced with the original caption",
    )
    max_new_tokens: int = Field(
        120, ge=1, description="most tokens the VLM may generate per caption"
    )
    do_sample: bool = Field(
        False,
        description="sample instead of greedy decoding (greedy is deterministic and resumable)",
    )
    temperature: float = Field(0.7, gt=0, description="sampling temperature, with --do-sample")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass, with --do-sample")
    seed: int = Field(0, description="random seed for sampling")
    max_caption_tokens: int = Field(
        T5_TRAINING_LENGTH,
        ge=1,
        description="token budget of a cleaned caption: the T5 length used when training "
        "(SD3 trained with 77 T5 tokens)",
    )
    budget_tokenizer: str | None = Field(
        None,
        description="tokenizer that counts the budget: a tokenizer folder or an SD3 model folder "
        "(its T5 tokenizer_3 is used); unset = whitespace-separated words",
    )
    batch_size: int = Field(
        8, ge=1, description="images per generate() call (backend transformers)"
    )
    device: str = device_option("backend transformers")
    dtype: str = Field("fp32", description="fp32, fp16 or bf16 (backend transformers)")
    trust_remote_code: bool = Field(
        False,
        description="allow the model folder's own Python code (for folders whose architecture "
        "transformers does not ship, e.g. the original Florence-2 repositories); only for folders you trust",
    )
    model_class: str | None = Field(
        None,
        description="transformers class to load the model with, e.g. LlavaForConditionalGeneration "
        "(default: AutoModelForImageTextToText)",
    )
    chunk_size: int = Field(
        256, ge=1, description="rows per resumable chunk: a killed run loses at most one chunk"
    )
    chunk_pixels: int = Field(
        32_000_000,
        ge=1,
        description="most pixels a worker decodes at once (images are captioned in groups under this bound)",
    )

    _json_object = field_validator("processor_kwargs", mode="before")(parse_json_object)


class InitCaptionerConfig(BaseModel):
    # `t2i init-captioner`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "write a random-weight tiny VLM folder (LLaVA, Florence-2 or Qwen2-VL) built offline"
    )
    description: ClassVar[str] = (
        "Builds a VLM with random weights and its processor (PIL image processor, WordPiece "
        "tokenizer, chat template where the family has one), all made locally, and saves a "
        "folder that AutoProcessor + AutoModelForImageTextToText load offline: --preset tiny "
        "is a LLaVA (CLIP vision tower + Llama decoder), tiny-florence2 a Florence-2 "
        "(encoder-decoder, task-token prompts such as <MORE_DETAILED_CAPTION>), tiny-qwen2vl "
        "a Qwen2-VL (dynamic resolution; --processor-kwargs '{\"max_pixels\": N}'). They "
        "generate word salad: they exist so tests and the demo run the real captioning code path."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("output", "directory for the VLM folder"),
    )

    preset: Literal["tiny", "tiny-florence2", "tiny-qwen2vl"] = Field(
        "tiny",
        description="random-weight VLM for offline tests: 'tiny' LLaVA (CLIP vision + Llama), "
        "'tiny-florence2' (DaViT + BART encoder-decoder), 'tiny-qwen2vl' (dynamic-resolution ViT + Qwen2)",
    )
    seed: int = Field(0, description="seed for the random weights")


class ServeCaptionerConfig(BaseModel):
    # `t2i serve-captioner`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "serve a local VLM folder over a minimal OpenAI-compatible chat API"
    description: ClassVar[str] = (
        "Serves GET /v1/models and POST /v1/chat/completions (one image as a base64 data URL "
        "plus a text prompt) from MODEL, a local image-text-to-text folder, until interrupted. "
        "A stand-in for vLLM/SGLang where they are not installed; `t2i caption --backend "
        "openai --endpoint http://HOST:PORT/v1 --model NAME` talks to it. If "
        "$T2I_SERVER_API_KEY is set, requests must carry it as a Bearer token."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (("model", "local VLM folder to serve"),)

    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    served_name: str | None = Field(
        None, description="model name clients ask for (default: the folder's name)"
    )
    device: str = device_option()
    dtype: str = Field("fp32", description="fp32, fp16 or bf16")
    trust_remote_code: bool = Field(
        False, description="allow the model folder's own Python code; only for folders you trust"
    )
    model_class: str | None = Field(
        None,
        description="transformers class to load the model with (default: AutoModelForImageTextToText)",
    )
    processor_kwargs: dict[str, Any] = Field(
        default_factory=dict, description=PROCESSOR_KWARGS_HELP
    )
    max_body_bytes: int = Field(
        32 << 20,
        ge=1024,
        description="largest request body accepted (bytes); a larger Content-Length is answered 413 unread",
    )
    max_tokens_limit: int = Field(
        512,
        ge=1,
        description="most tokens one request may generate; a larger max_tokens is lowered to this",
    )
    max_prompt_chars: int = Field(
        4096,
        ge=1,
        description="longest prompt (system and user text together, in characters) one request "
        "may send; a longer one is answered 400 before it is tokenized, so it cannot hold the model",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a connection that sends nothing for this long, or does not finish its "
        "request line, headers and body within 3 times this, is closed (408 when it can be told)",
    )
    max_connections: int = Field(
        64,
        ge=1,
        description="connections served at once; one more is answered 503 and closed at once",
    )
    fail_first: int = Field(
        0, ge=0, description="answer the first N chat requests with an error (client retry drills)"
    )
    fail_status: int = Field(
        503,
        ge=400,
        le=599,
        description="HTTP status of those failures, e.g. 429 (sent with Retry-After: 0) or 503",
    )

    _json_object = field_validator("processor_kwargs", mode="before")(parse_json_object)
