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
]
