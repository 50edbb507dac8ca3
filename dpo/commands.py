"""Command-line surface of the dpo package, as data (see flows/cli.py)."""

COMMANDS = [
    {
        "name": "prefs",
        "summary": "ingest preference pairs (Pick-a-Pic v2, generic, or a folder of pairs)",
        "description": (
            "Reads Pick-a-Pic v2 (caption, jpg_0, jpg_1, label_0; parquet or a saved dataset), a generic "
            "layout (caption, image_w, image_l) or a folder with one sub-folder per pair (caption.txt, "
            "winner.*, loser.*) and writes a preference table. Ties (label 0.5), identical images, "
            "undecodable images and empty captions go to rejected/ with their reason."
        ),
        "config": "dpo.config:IngestPrefsConfig",
        "run": "dpo.ingest:run_ingest_prefs",
        "positionals": [
            ("source", "preference data in any supported layout"),
            ("output", "output directory"),
        ],
    },
    {
        "name": "dpo",
        "summary": "align a model with rank-128 LoRA Diffusion-DPO on preference pairs",
        "description": (
            "Diffusion-DPO (Wallace et al. 2023) on the rectified-flow velocity target, with a LoRA "
            "(rank 128, alpha 128) on every linear layer of the MMDiT blocks (SD3 appendix C). Winner "
            "and loser share t and noise; the reference is the same network with the adapter disabled. "
            "PREFS is raw preference data (any layout `t2i prefs` reads) or its output. Writes "
            "OUTPUT/pytorch_lora_weights.safetensors (StableDiffusion3Pipeline.load_lora_weights reads "
            "it), metrics.jsonl (loss, implicit accuracy, reward margin, model/reference errors) and "
            "summary.json (held-out implicit accuracy). Rerunning an interrupted run resumes from its "
            "last checkpoint."
        ),
        "config": "dpo.config:DPOConfig",
        "run": "dpo.trainer:run_dpo",
        "positionals": [
            ("prefs", "preference data or a `t2i prefs` output"),
            ("output", "output directory"),
        ],
    },
    {
        "name": "make-prefs",
        "summary": "build synthetic preference pairs from a folder of images",
        "description": (
            "Makes two edited copies of each image, one with a measurable attribute (a warm tint, or "
            "brightness) and one with its opposite, and writes them as a folder of pairs (winner = the "
            "attribute) that `t2i dpo` reads. For demos and for checking that DPO moves a model the "
            "right way; --swap makes the control with the labels reversed."
        ),
        "config": "dpo.config:MakePrefsConfig",
        "run": "dpo.synthetic:run_make_prefs",
        "positionals": [("output", "directory for the pair folders")],
    },
]
