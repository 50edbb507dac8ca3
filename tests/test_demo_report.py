"""What `make demo` prints about DPO and the labelled grids it writes (flows/demo.py)."""

from __future__ import annotations

import json

from PIL import Image

from flows.demo import LABEL_HEIGHT, dpo_lines, sample_grids

EVALUATION = {
    "captions": ["a warm page", "a cold lake"],
    "seeds": [0, 1],
    "grids": ["eval/grid-00.png", "eval/grid-01.png"],
    "scorer": "attribute:warm",
    "base_scores": [[0.1, 0.2], [0.3, 0.3]],
    "lora_scores": [[0.2, 0.3], [0.3, 0.1]],
    "win_rate": 0.5,
    "roles": ["preference", "off-target"],
}


def summary(drift: float, warning: str | None = None) -> dict:
    return {
        "sample_eval": EVALUATION,
        "sample_win_rate": 1.0,
        "guard": {"winner_drift": drift, "warning": warning},
    }


def test_the_win_rate_and_the_per_prompt_table_are_printed():
    text = "\n".join(dpo_lines(summary(drift=-1e-4)))
    assert "beats the base on 100% of held-out samples under attribute:warm" in text
    assert "| a warm page | preference |" in text and "| a cold lake" in text
    assert "2 / 0 / 0" in text  # the LoRA won both seeds of the preference caption
    assert "WARNING" not in text  # winners got better than the reference


def test_winners_worse_than_the_reference_print_a_guard_warning():
    text = "\n".join(dpo_lines(summary(drift=7.7e-05)))
    assert "WARNING (DPO guard)" in text and "+7.7e-05" in text
    guard = "\n".join(dpo_lines(summary(drift=1e-3, warning="winners got worse ...")))
    assert "WARNING (DPO guard): winners got worse ..." in guard


def test_no_scorer_says_so():
    plain = {
        "sample_eval": {**EVALUATION, "base_scores": None, "lora_scores": None, "scorer": None}
    }
    assert "no scorer" in dpo_lines(plain)[0]


def test_grids_are_labelled_with_base_lora_and_each_rows_prompt_and_seed(tmp_path):
    side = 32
    red, blue = (
        Image.new("RGB", (side, side), (200, 0, 0)),
        Image.new("RGB", (side, side), (0, 0, 200)),
    )
    for role, image in (("base", red), ("lora", blue)):
        folder = tmp_path / "samples" / "seed-0" / role
        folder.mkdir(parents=True)
        image.save(folder / "000-a-red-cat-seed0.png")
    eval_dir = tmp_path / "lora" / "eval"
    eval_dir.mkdir(parents=True)
    grid = Image.new("RGB", (2 * side + 4, 2 * side + 4), "white")  # dpo's side by side, 2 seeds
    for row in range(2):
        grid.paste(red, (0, row * (side + 4)))
        grid.paste(blue, (side + 4, row * (side + 4)))
    for name in EVALUATION["grids"]:
        grid.save(tmp_path / "lora" / name)
    (tmp_path / "lora" / "summary.json").write_text(json.dumps(summary(drift=0.0)))

    written = sample_grids(tmp_path)
    assert [p.name for p in written] == ["samples.png", "grid-00.png", "grid-01.png"]
    samples = Image.open(written[0]).convert("RGB")
    assert samples.size == (2 * side + 4, LABEL_HEIGHT + LABEL_HEIGHT + side + 4)
    top = 2 * LABEL_HEIGHT  # the header, then the row's label, then the images
    assert samples.getpixel((side // 2, top + side // 2)) == (200, 0, 0)  # base on the left
    assert samples.getpixel((side + 4 + side // 2, top + side // 2)) == (0, 0, 200)  # LoRA right
    header = samples.crop((0, 0, side, LABEL_HEIGHT))
    assert min(p[0] for p in header.getdata()) < 100  # text drawn in the header
    evaluation = Image.open(written[1]).convert("RGB")
    assert evaluation.size == (2 * side + 4, LABEL_HEIGHT + 2 * (LABEL_HEIGHT + side + 4))
