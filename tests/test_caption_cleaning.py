import pytest

from captioning.cleaning import clean_caption, make_budget, word_budget
from captioning.prompts import BUILTIN_PROMPTS, load_template, render
from model.tokenizers import build_t5_tokenizer


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("The image shows a grey cat.", "A grey cat."),
        ("In this image, a cat sits on a mat.", "A cat sits on a mat."),
        ("This image depicts an astronaut in a white suit.", "An astronaut in a white suit."),
        ("In the picture we can see a cup of coffee.", "A cup of coffee."),
        ("This is a photo of two dogs in the snow", "Two dogs in the snow"),
        ("Caption: The photograph features a red rocket", "A red rocket"),
        ("Here is a detailed description of the image: A cat sleeps.", "A cat sleeps."),
        ("In this scene there are two horses on grass.", "Two horses on grass."),
    ],
)
def test_boilerplate_openings_are_removed(raw, clean):
    assert clean_caption(raw) == clean


def test_content_that_only_resembles_boilerplate_is_kept():
    assert clean_caption("The cat shows its teeth.") == "The cat shows its teeth."
    assert (
        clean_caption("An image of a cat printed on a mug.")
        == "An image of a cat printed on a mug."
    )


def test_whitespace_quotes_and_markup_are_tidied():
    assert clean_caption('  "**A red** rocket\n\n  on the   pad."  ') == "A red rocket on the pad."
    assert clean_caption("   \n ") == ""


def test_a_long_caption_is_cut_at_the_last_sentence_that_fits():
    text = "A grey cat sits on a mat. It has green eyes and long fur and a short tail."
    fitted, cut = word_budget(10).fit(text)
    assert (fitted, cut) == ("A grey cat sits on a mat.", True)


def test_without_a_sentence_end_the_cut_falls_on_a_whole_word():
    fitted, cut = word_budget(5).fit("A grey cat, green eyes, long fur and a short tail")
    assert (fitted, cut) == ("A grey cat, green eyes", True)


def test_a_caption_within_budget_is_unchanged():
    assert word_budget(77).fit("A grey cat.") == ("A grey cat.", False)


def test_the_budget_counts_t5_tokens_of_an_sd3_folder_including_eos(tmp_path):
    t5 = build_t5_tokenizer()
    t5.save_pretrained(tmp_path / "sd3" / "tokenizer_3")
    budget = make_budget(77, str(tmp_path / "sd3"))  # an SD3 folder: its tokenizer_3 is used
    text = " ".join(["a photo of a grey cat with green eyes"] * 20) + "."
    fitted, cut = budget.fit(text)
    ids = t5(fitted)["input_ids"]
    assert cut and len(ids) <= 77 and ids[-1] == t5.eos_token_id
    assert len(t5(fitted + " grey cat")["input_ids"]) > 77 - 5  # it used most of the budget
    assert (
        t5(fitted, max_length=77, truncation=True)["input_ids"] == ids
    )  # T5 will not cut it again


def test_a_budget_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="budget tokenizer"):
        make_budget(77, str(tmp_path / "missing"))


def test_the_hint_prompt_passes_the_original_caption():
    prompt = render(load_template("hint"), "  a cat on a mat ")
    assert '"a cat on a mat"' in prompt
    assert render(load_template("detailed"), "a cat") == BUILTIN_PROMPTS["detailed"]


def test_a_template_file_replaces_the_builtin_prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Caption this photo. Alt text: {caption}. Use {{no}} lists.\n")
    assert (
        render(load_template("detailed", str(path)), "a dog")
        == "Caption this photo. Alt text: a dog. Use {no} lists."
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("Describe {subject}.", "unknown placeholder"),
        ("Describe {caption.", "not a valid template"),
        ("  ", "empty"),
    ],
)
def test_a_bad_template_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "prompt.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_template("detailed", str(path))
