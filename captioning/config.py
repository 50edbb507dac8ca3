"""Options of the captioning package's commands (the CLI, Prefect forms and manifests share them).

Kept free of heavy imports (torch, transformers) so that `t2i --help` stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# SD3 trained with T5 sequences of 77 tokens (paper Sec. 5.3.2 / Table 7), so a synthetic
# caption longer than that is cut by the text encoder anyway; we cut it first, at a sentence
# or word boundary, so the model never sees half a word.
T5_TRAINING_LENGTH = 77


class CaptionConfig(BaseModel):
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
    prompt: Literal["detailed", "hint"] = Field(
        "detailed",
        description="'detailed': a plain detailed-description prompt; 'hint': PixArt-style, "
        "passes the original caption as a hint",
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
    device: str = Field(
        "cpu", description="torch device, e.g. cuda or cuda:1 (backend transformers)"
    )
    dtype: str = Field("fp32", description="fp32, fp16 or bf16 (backend transformers)")
    trust_remote_code: bool = Field(
        False,
        description="allow the model folder's own Python code (needed by e.g. CogVLM2, Florence-2); "
        "only for folders you trust",
    )
    model_class: str | None = Field(
        None,
        description="transformers class to load the model with, e.g. LlavaForConditionalGeneration "
        "(default: AutoModelForImageTextToText)",
    )
    chunk_size: int = Field(
        256, ge=1, description="rows per resumable chunk: a killed run loses at most one chunk"
    )


class InitCaptionerConfig(BaseModel):
    preset: Literal["tiny"] = Field(
        "tiny", description="'tiny': a random-weight LLaVA (CLIP vision + Llama) for offline tests"
    )
    seed: int = Field(0, description="seed for the random weights")


class ServeCaptionerConfig(BaseModel):
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 = any free port)")
    served_name: str | None = Field(
        None, description="model name clients ask for (default: the folder's name)"
    )
    device: str = Field("cpu", description="torch device, e.g. cuda or cuda:1")
    dtype: str = Field("fp32", description="fp32, fp16 or bf16")
    trust_remote_code: bool = Field(
        False, description="allow the model folder's own Python code; only for folders you trust"
    )
    model_class: str | None = Field(
        None,
        description="transformers class to load the model with (default: AutoModelForImageTextToText)",
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
    fail_first: int = Field(
        0, ge=0, description="answer the first N chat requests with an error (client retry drills)"
    )
    fail_status: int = Field(
        503,
        ge=400,
        le=599,
        description="HTTP status of those failures, e.g. 429 (sent with Retry-After: 0) or 503",
    )
