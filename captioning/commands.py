"""Command-line surface of the captioning package, as data (see flows/cli.py)."""

COMMANDS = [
    {
        "name": "caption",
        "summary": "recaption a curated store with a VLM (local model or OpenAI-compatible server)",
        "description": (
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
        ),
        "config": "captioning.config:CaptionConfig",
        "run": "captioning.stage:run_caption",
        "positionals": [("input", "curated store to caption"), ("output", "directory to write")],
    },
    {
        "name": "init-captioner",
        "summary": "write a random-weight tiny VLM folder (LLaVA, Florence-2 or Qwen2-VL) built offline",
        "description": (
            "Builds a VLM with random weights and its processor (PIL image processor, WordPiece "
            "tokenizer, chat template where the family has one), all made locally, and saves a "
            "folder that AutoProcessor + AutoModelForImageTextToText load offline: --preset tiny "
            "is a LLaVA (CLIP vision tower + Llama decoder), tiny-florence2 a Florence-2 "
            "(encoder-decoder, task-token prompts such as <MORE_DETAILED_CAPTION>), tiny-qwen2vl "
            "a Qwen2-VL (dynamic resolution; --processor-kwargs '{\"max_pixels\": N}'). They "
            "generate word salad: they exist so tests and the demo run the real captioning code path."
        ),
        "config": "captioning.config:InitCaptionerConfig",
        "run": "captioning.tiny:run_init_captioner",
        "positionals": [("output", "directory for the VLM folder")],
    },
    {
        "name": "serve-captioner",
        "summary": "serve a local VLM folder over a minimal OpenAI-compatible chat API",
        "description": (
            "Serves GET /v1/models and POST /v1/chat/completions (one image as a base64 data URL "
            "plus a text prompt) from MODEL, a local image-text-to-text folder, until interrupted. "
            "A stand-in for vLLM/SGLang where they are not installed; `t2i caption --backend "
            "openai --endpoint http://HOST:PORT/v1 --model NAME` talks to it. If "
            "$T2I_SERVER_API_KEY is set, requests must carry it as a Bearer token."
        ),
        "config": "captioning.config:ServeCaptionerConfig",
        "run": "captioning.server:run_server",
        "positionals": [("model", "local VLM folder to serve")],
    },
]
