"""Command-line surface of the model package, as data (see flows/cli.py)."""

COMMANDS = [
    {
        "name": "init-model",
        "summary": "write a random-weight SD3 pipeline folder built from configs (offline)",
        "description": (
            "Builds SD3Transformer2DModel (QK RMS-norm), a 16-channel AutoencoderKL, CLIP-L, CLIP-G, "
            "T5 and their tokenizers from configs alone, with random weights, and saves a diffusers "
            "folder that StableDiffusion3Pipeline.from_pretrained(OUTPUT) loads with no model hub."
        ),
        "config": "model.config:InitModelConfig",
        "run": "model.build:run_init_model",
        "positionals": [("output", "directory for the diffusers pipeline folder")],
    },
    {
        "name": "sample",
        "summary": "generate images from a diffusers SD3 folder",
        "description": (
            "Loads --model (any local SD3/SD3.5 diffusers folder, e.g. stable-diffusion-3-medium-"
            "diffusers or `t2i init-model` output) and writes one PNG per prompt and seed to --out."
        ),
        "config": "model.config:SampleConfig",
        "run": "model.sampling:run_sample",
    },
    {
        "name": "precompute",
        "summary": "pre-encode VAE latents and CLIP-L/CLIP-G/T5 embeddings of a captioned set (16-bit, memory-mapped)",
        "description": (
            "Reads a curated or captioned store (id, image, caption, optional caption_synthetic) and "
            "encodes every image (square center crop at --resolution, or aspect-ratio buckets) with the "
            "VAE of --model (latents after its shift and scaling factors), and the original caption, the "
            "synthetic caption when present and the empty prompt with CLIP-L, CLIP-G (penultimate states "
            "+ pooled projections) and T5 (last hidden states, --t5-length tokens, with the mask), exactly "
            "as StableDiffusion3Pipeline.encode_prompt does (SD3 section 5.3.1). One encoder is loaded at "
            "a time; output is safetensors shards plus an index, resumable per shard. Images that fail "
            "are listed in OUTPUT/rejected. Read the result with model.encoded.EncodedDataset."
        ),
        "config": "model.config:PrecomputeConfig",
        "run": "model.precompute:run_precompute",
        "positionals": [
            ("input", "a curated or captioned store (a stage output directory)"),
            ("output", "directory for the pre-encoded set"),
        ],
    },
    {
        "name": "train",
        "summary": "train the SD3 MMDiT with rectified flow on a pre-encoded set",
        "description": (
            "Reads ENCODED (output of `t2i precompute`) and trains --model's transformer, or a fresh "
            "one from --preset, with the SD3 recipe: logit-normal(0, 1) timesteps with the resolution "
            "shift, velocity loss eps - x0, each text encoder dropped with p = 0.464, original or "
            "synthetic caption with p = 0.5, AdamW (lr 1e-4, eps 1e-15, 1000 warmup steps), EMA. "
            "Writes OUTPUT as a diffusers SD3 folder (EMA weights, training shift in the scheduler) and "
            "OUTPUT/training/{checkpoints,logs,samples}. Resume with --resume latest. Multi-GPU/FSDP: "
            "`accelerate launch -m flows.cli train ...` with accelerate's own config."
        ),
        "config": "model.config:TrainConfig",
        "run": "model.train:run_train",
        "positionals": [
            ("encoded", "pre-encoded set written by `t2i precompute`"),
            ("output", "directory for the trained diffusers pipeline folder"),
        ],
    },
    {
        "name": "lora-convert",
        "summary": "convert an SD3 LoRA between diffusers, kohya and ComfyUI key styles",
        "description": (
            "Reads a LoRA file (or a folder holding one) in diffusers, kohya (sd-scripts lora_sd3), "
            "ComfyUI, OneTrainer or peft key style, detected from its keys, and writes it in --to's "
            "style. kohya and ComfyUI use Stability's MMDiT module names with q/k/v fused (downs "
            "stacked, ups block-diagonal, alpha scaled with the rank); diffusers files carry alpha "
            "folded into B. Converting back gives the same matrices. OUTPUT is a .safetensors path or "
            "a folder (then OUTPUT/pytorch_lora_weights.safetensors)."
        ),
        "config": "model.config:LoraConvertConfig",
        "run": "model.lora_formats:run_lora_convert",
        "positionals": [
            ("input", "LoRA .safetensors file or a folder with one"),
            ("output", "a .safetensors path or a folder"),
        ],
    },
]
