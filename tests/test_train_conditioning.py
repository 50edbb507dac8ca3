"""The conditioning side of `t2i train`, pinned where it reaches the transformer.

Every test here records what the MMDiT is actually given inside a real `train` run (a spy on
SD3Transformer2DModel.forward) or compares our sampler with diffusers' own, so a trainer that
ignores the encoder-drop mask, swaps kept and dropped encoders, drops the three encoders together,
freezes a sample's caption choice across steps, feeds another unconditional input than the stock
pipeline's negative prompt, or guides with another formula fails one of them.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import SD3Transformer2DModel

from model.conditioning import ENCODER_DROP_PROB, TextEncoding
from model.config import TrainConfig
from model.encoders import encode_texts
from model.folders import load_pipeline
from model.latent_sampling import sample_latents
from model.train import train

# The tiny kit's widths (model/presets.py): CLIP-L 32, CLIP-G 48, T5 96; the set's T5 length.
D_L, D_G, D_T5, T5_LEN = 32, 48, 96, 32
TOL = {"rtol": 2e-3, "atol": 2e-3}  # precompute stores 16-bit encodings


class Spy:
    """Records (encoder_hidden_states, pooled_projections) of every transformer call."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        real = SD3Transformer2DModel.forward
        spy = self

        def forward(module, *args, **kwargs):
            spy.calls.append(
                (
                    kwargs["encoder_hidden_states"].detach().float().clone(),
                    kwargs["pooled_projections"].detach().float().clone(),
                )
            )
            return real(module, *args, **kwargs)

        monkeypatch.setattr(SD3Transformer2DModel, "forward", forward)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([c[0] for c in self.calls]), torch.cat([c[1] for c in self.calls])


def only_training(model: str, **overrides) -> TrainConfig:
    """A short CPU run whose only transformer calls are training steps (no validation, grids)."""
    base = dict(
        model=model,
        device="cpu",
        batch_size=4,
        max_steps=3,
        warmup_steps=1,
        lr=1e-3,
        log_every=100,
        val_fraction=0.0,
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=0,
    )
    return TrainConfig(**{**base, **overrides})


def pipeline_encoding(pipe, prompt: str, negative: str = ""):
    """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled) as the stock pipeline makes them."""
    return pipe.encode_prompt(
        prompt,
        None,
        None,
        negative_prompt=negative,
        do_classifier_free_guidance=True,
        max_sequence_length=T5_LEN,
    )


# ----------------------------------------------------------------------------- unconditional input


def test_dropped_encoders_train_on_exactly_the_negative_input_the_stock_pipeline_guides_with(
    tmp_path, shapes, tiny_model_dir, monkeypatch
):
    from model.sampling import zero_negative_inputs

    pipe = load_pipeline(tiny_model_dir)
    _, negative, _, negative_pooled = pipeline_encoding(pipe, "a red circle")
    pairs = [(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square")]
    captions = [f"a {c} {s}" for c, s in pairs]  # and tests/train_sets.py's synthetic captions
    captions += [f"a photo of a {s} in {c} on a dark background" for c, s in pairs]
    conditional = [pipeline_encoding(pipe, c) for c in captions]

    # Every encoder dropped: each training input is the pipeline's encoding of negative_prompt "".
    spy = Spy(monkeypatch)
    train(
        shapes,
        tmp_path / "all-dropped",
        only_training(tiny_model_dir, preset="tiny", encoder_drop=1.0),
    )
    sequence, pooled = spy.rows()
    assert len(sequence) == 12
    for row, row_pooled in zip(sequence, pooled, strict=True):
        torch.testing.assert_close(row, negative[0], **TOL)
        torch.testing.assert_close(row_pooled, negative_pooled[0], **TOL)

    # Nothing dropped: each input is one of the set's captions as the pipeline encodes it, never "".
    spy.calls.clear()
    train(
        shapes,
        tmp_path / "none-dropped",
        only_training(tiny_model_dir, preset="tiny", encoder_drop=0.0),
    )
    sequence, pooled = spy.rows()
    for row, row_pooled in zip(sequence, pooled, strict=True):
        assert not torch.allclose(row, negative[0], **TOL)
        matches = [
            torch.allclose(row, c[0][0], **TOL) and torch.allclose(row_pooled, c[2][0], **TOL)
            for c in conditional
        ]
        assert sum(matches) == 1

    # --unconditional zeros: the dropped input is the zeros `t2i sample` then guides against.
    spy.calls.clear()
    config = only_training(tiny_model_dir, preset="tiny", encoder_drop=1.0, unconditional="zeros")
    train(shapes, tmp_path / "zeros", config)
    sequence, pooled = spy.rows()
    zeros = zero_negative_inputs(pipe, "a red circle", T5_LEN)
    assert torch.equal(sequence, zeros["negative_prompt_embeds"].expand_as(sequence))
    assert torch.equal(pooled, zeros["negative_pooled_prompt_embeds"].expand_as(pooled))


# ----------------------------------------------------------------------------- drop mask, caption choice


class UniqueTexts:
    """An in-memory reader (model.train_data.EncodedReader) whose every (sample, caption variant)
    and the empty prompt have their own random encodings, so each encoder's part of a training
    input tells which caption of which sample it came from, or that it was dropped."""

    def __init__(self, n: int = 16):
        self.ids = [f"sample-{i:02d}" for i in range(n)]
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(n, 16, 8, 8, generator=g)
        self.texts = {(i, v): self._random(g) for i in range(n) for v in ("original", "synthetic")}
        self.empty = self._random(g)

    @staticmethod
    def _random(g) -> TextEncoding:
        r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
        return TextEncoding(
            r(77, D_L), r(D_L), r(77, D_G), r(D_G), r(T5_LEN, D_T5), torch.ones(T5_LEN)
        )

    def __len__(self):
        return len(self.ids)

    def bucket(self, i):
        return (8, 8)

    def has_synthetic(self, i):
        return True

    def sample(self, i, variant="original"):
        return {
            "id": self.ids[i],
            "latents": self.latents[i],
            "text": self.texts[(i, variant)],
            "variant": variant,
        }

    def empty_text(self):
        return self.empty


def parts(sequence: torch.Tensor, pooled: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each encoder's pieces of a batch of joint conditions (CLIP channels are zero-padded to T5's width)."""
    return {
        "clip_l": (sequence[:, :77, :D_L], pooled[:, :D_L]),
        "clip_g": (sequence[:, :77, D_L : D_L + D_G], pooled[:, D_L:]),
        "t5": (sequence[:, 77:],),
    }


def source_of(reader: UniqueTexts, encoder: str, pieces: tuple[torch.Tensor, ...]):
    """'empty', or the (sample, variant) whose encoding these pieces of one row are."""
    fields = {
        "clip_l": ("clip_l", "clip_l_pooled"),
        "clip_g": ("clip_g", "clip_g_pooled"),
        "t5": ("t5",),
    }[encoder]
    candidates = {"empty": reader.empty, **reader.texts}
    found = [
        key
        for key, text in candidates.items()
        if all(torch.equal(p, getattr(text, f)) for p, f in zip(pieces, fields, strict=True))
    ]
    assert len(found) == 1, (
        f"{encoder} input is neither a caption's encoding nor the empty prompt's"
    )
    return found[0]


def test_each_encoder_is_dropped_independently_at_its_rate_and_captions_are_drawn_per_sample_per_step(
    tmp_path, tiny_model_dir, monkeypatch
):
    reader = UniqueTexts(16)
    spy = Spy(monkeypatch)
    steps = 60
    config = only_training(
        tiny_model_dir, preset="tiny", batch_size=16, max_steps=steps, synthetic_caption_p=0.5
    )  # the defaults: encoder_drop 0.464
    assert config.encoder_drop == ENCODER_DROP_PROB == 0.464
    train(reader, tmp_path / "run", config)
    assert len(spy.calls) == steps

    dropped, seen, per_step_variants = [], {}, []
    for sequence, pooled in spy.calls:
        batch_parts = parts(sequence, pooled)
        step_variants = set()
        for k in range(len(sequence)):
            sources = {
                e: source_of(reader, e, tuple(p[k] for p in pieces))
                for e, pieces in batch_parts.items()
            }
            dropped.append([sources[e] == "empty" for e in ("clip_l", "clip_g", "t5")])
            kept = {s for s in sources.values() if s != "empty"}
            assert len(kept) <= 1, "the kept encoders of one sample came from different captions"
            if kept:
                sample, variant = kept.pop()
                seen.setdefault(sample, []).append(variant)
                step_variants.add(variant)
        per_step_variants.append(step_variants)
    drops = torch.tensor(dropped, dtype=torch.float64)  # [rows, 3]
    n = len(drops)
    assert n == steps * 16

    # Each encoder at 0.464 (4 sigma), and independently: every keep/drop pattern of the three
    # occurs, all three together ~0.464^3 = 10% and each pair ~0.464^2 (not 0.464, as one shared mask gives).
    sigma = (0.464 * 0.536 / n) ** 0.5
    assert torch.allclose(
        drops.mean(0), torch.full((3,), 0.464, dtype=torch.float64), atol=4 * sigma
    )
    patterns = {tuple(row) for row in drops.bool().tolist()}
    assert patterns == set(itertools.product((False, True), repeat=3))
    assert drops.prod(1).mean().item() == pytest.approx(0.464**3, abs=0.035)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert (drops[:, a] * drops[:, b]).mean().item() == pytest.approx(0.464**2, abs=0.06)

    # The caption variant is drawn per sample per step: every sample trains on both of its
    # captions over the run (about half and half), and steps mix variants across their samples.
    assert len(seen) == 16
    for sample, variants in seen.items():
        share = variants.count("synthetic") / len(variants)
        assert 0.2 < share < 0.8, (sample, share, len(variants))
    assert sum(len(v) == 2 for v in per_step_variants) >= 0.9 * steps


# ----------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_our_guided_sampler_is_the_stock_pipelines(guidance, tiny_model_dir):
    """v = v_u + g (v_c - v_u) on diffusers' grid: the same latents as StableDiffusion3Pipeline."""
    pipe = load_pipeline(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.eval()
    with torch.no_grad():  # random weights with some spread, so v_c and v_u differ clearly
        for p in transformer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    prompt = "a red circle"
    text = encode_texts(tiny_model_dir, [prompt], t5_length=T5_LEN, progress=False)
    empty = encode_texts(tiny_model_dir, [""], t5_length=T5_LEN, progress=False)
    negative = TextEncoding(**{k: v[0] for k, v in vars(empty).items()})
    shape, seeds, steps = (16, 8, 8), [3], 6
    shift = pipe.scheduler.config.shift
    ours = sample_latents(transformer, text, negative, seeds, shape, steps, shift, guidance)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seeds[0]))[None]
    stock = pipe(
        prompt=prompt,
        latents=noise.clone(),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=T5_LEN,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
    unguided = sample_latents(transformer, text, negative, seeds, shape, steps, shift, 1.0)
    if guidance != 1.0:  # the two conditions really pull apart here
        assert (ours - unguided).abs().max() > 0.05


# ----------------------------------------------------------------------------- learning-rate schedule


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_the_learning_rate_warms_up_linearly_then_holds_or_decays_to_zero_at_max_steps(decay):
    import math

    from model.train_step import warmup_schedule

    warmup, total = 10, 110
    multiplier = warmup_schedule(warmup, decay, total)
    assert [multiplier(s) for s in range(warmup)] == pytest.approx(
        [(s + 1) / 10 for s in range(10)]
    )
    halfway = multiplier(warmup + (total - warmup) // 2)
    expected = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi / 2)), "linear": 0.5}
    assert halfway == pytest.approx(expected[decay])
    assert multiplier(total) == pytest.approx(1.0 if decay == "constant" else 0.0, abs=1e-12)
    steps = [multiplier(s) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # never rises after the warmup
    with pytest.raises(ValueError, match="schedule"):
        warmup_schedule(10, "step", 100)(50)
