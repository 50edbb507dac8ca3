"""Diffusion-DPO: preference ingest, synthetic pairs, the LoRA trainer and its evaluation."""

import model  # noqa: F401 - first, so bitsandbytes' import-time kernel warning stays quiet
