"""The SD3 model stages: init-model, precompute, train, sample, lora-convert.

Importing any of them imports diffusers, which imports peft, which imports bitsandbytes when it
is installed (our 8-bit AdamW). On a CPU with AVX512-BF16 bitsandbytes then logs, at import, a
warning that an optional 4-bit matmul kernel package (`kernels`) is missing. This project never
runs 4-bit matmuls, with or without `--optimizer adamw8bit`, so that logger is quieted here,
before anything can import bitsandbytes; its errors still show. Where `kernels` is installed
(transformers 5.25 requires it), bitsandbytes asks it for that kernel from the Hub at import, and
in offline mode (the CLI's default) `kernels` warns that it skips the publisher check; the kernel
is never used, so its warnings are quieted too.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)
