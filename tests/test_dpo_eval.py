"""Sample-level evaluation of a DPO LoRA (dpo/evaluate.py): base vs LoRA side by side, a scorer's
win rate, and the stage report the Prefect artifact shows."""

import pytest
import torch
from PIL import Image

from dpo.evaluate import clip_scorer, load_scorer, report_markdown, win_rate


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP preference model folder (PickScore's layout: model + processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from model.tokenizers import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("scorer") / "tiny-pickscore"
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _image(rgb):
    return Image.new("RGB", (40, 40), rgb)


def test_clip_scorer_is_logit_scale_times_cosine_of_the_models_own_embeddings(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images, captions = [_image((200, 30, 30)), _image((30, 30, 200))], ["a red cat", "a blue dog"]
    scores = clip_scorer(tiny_clip_dir)(images, captions)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    inputs = CLIPProcessor.from_pretrained(tiny_clip_dir)(
        text=captions, images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)  # logits_per_image[i, j]: image i vs caption j
    expected = out.logits_per_image.diagonal().tolist()
    assert scores == pytest.approx(expected, rel=1e-4)
    assert scores[0] != pytest.approx(scores[1])


def test_scorer_specs_and_win_rate():
    warm = load_scorer("attribute:warm")
    assert warm([_image((200, 30, 30)), _image((30, 30, 200))], ["x", "x"])[0] > 0.5
    with pytest.raises(ValueError, match="warm and bright"):
        load_scorer("attribute:loud")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_scorer("/no/such/folder")
    assert win_rate([0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.1, 0.9]) == pytest.approx(
        (1 + 0.5 + 0 + 1) / 4
    )
    with pytest.raises(ValueError):
        win_rate([], [])


def test_a_folder_without_a_processor_is_refused_with_its_reason(tiny_clip_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        clip_scorer(tmp_path)


def test_report_puts_samples_and_win_rate_first_and_escapes_captions():
    summary = {
        "sample_eval": {
            "captions": ["a <b>red</b> | cat"],
            "seeds": [0, 1],
            "grids": ["eval/grid-00.png"],
            "scorer": "attribute:warm",
            "base_scores": [[0.1, 0.2]],
            "lora_scores": [[0.3, 0.1]],
            "win_rate": 0.5,
        },
        "heldout_implicit_acc": 0.9,
        "heldout_pairs": 3,
        "guard": {
            "winner_drift": 0.02,
            "loser_drift": 0.5,
            "saturated_frac": 0.75,
            "warning": "winners got worse",
        },
    }
    text = report_markdown(summary)
    assert text.index("Win rate of the LoRA over the base: 0.50") < text.index("implicit accuracy")
    assert "training diagnostic" in text.lower() or "Training diagnostics" in text
    assert "&lt;b&gt;red&lt;/b&gt; \\| cat" in text and "<b>" not in text
    assert "| 1 / 0 / 1 |" in text and "![" in text and "(eval/grid-00.png)" in text
    assert "**Warning:** winners got worse" in text and "75%" in text


def test_the_per_prompt_table_names_the_worst_off_target_caption_not_the_mean():
    from dpo.evaluate import per_prompt_table, prompt_changes, worst_off_target

    evaluation = {
        "captions": ["an image", "a blue car", "a green car", "a red car"],
        "roles": ["preference", "off-target", "off-target", "off-target"],
        "base_scores": [[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.0, 0.5]],
        "lora_scores": [[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [1.0, 1.0]],
    }
    changes = {r["caption"]: r["change"] for r in prompt_changes(evaluation)}
    assert changes == {"an image": 1.0, "a blue car": -0.5, "a green car": 0.0, "a red car": 0.75}
    assert sum(changes[c] for c in evaluation["captions"][1:]) / 3 > 0  # the mean looks fine
    assert worst_off_target(evaluation)["caption"] == "a blue car"
    lines = per_prompt_table(evaluation).splitlines()
    assert lines[2].startswith("| an image | preference |")  # the preference captions first
    assert (
        lines[3]
        == "| a blue car **(worst off-target)** | off-target | 1 | 0.5 | -0.5 | 0 / 1 / 1 |"
    )
    assert [line.split(" |")[0] for line in lines[4:]] == ["| a green car", "| a red car"]
    assert worst_off_target({**evaluation, "roles": ["preference"] * 4}) is None
