"""One option vocabulary across stages (curate/runtime/options.py, docs/options.md): the same name, type and
default for the same idea in every command, and the old spellings still accepted for one release."""

from __future__ import annotations

import typing
import warnings
from pathlib import Path

import pytest
import torch

from curate.runtime.config_file import read_config_file
from curate.runtime.options import VOCABULARY, OptionRenamed, options_table, resolve_device
from dpo.config import DPOConfig
from flows.cli import build_parser, resolve_config
from flows.commands import COMMANDS
from model.config import SampleConfig, TrainConfig
from model.lora_targets import TARGET_SETS

ROOT = Path(__file__).resolve().parents[1]


def base_type(annotation):
    """The annotation without its `| None` (a stage may leave an option unset)."""
    if typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def default_of(info):
    return info.get_default(call_default_factory=True)


def test_every_command_gives_each_shared_idea_the_same_name_type_and_default():
    seen: dict[str, set[str]] = {name: set() for name in VOCABULARY}
    for entry in COMMANDS:
        for name, info in entry.config.model_fields.items():
            option = VOCABULARY.get(name)
            if option is None:
                continue
            seen[name].add(entry.name)
            where = f"t2i {entry.name} --{name.replace('_', '-')}"
            assert entry.name in option.commands, f"{where}: add the command to VOCABULARY"
            assert base_type(info.annotation) == option.type, where
            expected = option.default_for(entry.name)
            if (
                name == "lora_targets"
            ):  # a shorthand in the vocabulary, the expanded list in the field
                expected = TARGET_SETS[expected]
            assert default_of(info) == expected, where
    for name, option in VOCABULARY.items():
        assert seen[name] == set(option.commands), f"--{name}: listed for commands without it"


def test_no_command_keeps_an_old_spelling_as_an_option_of_its_own():
    old = {o for option in VOCABULARY.values() for o in option.renamed.values()}
    for entry in COMMANDS:
        renamed = getattr(entry.config, "RENAMED", {})
        assert not old & set(entry.config.model_fields), entry.name
        for before, after in renamed.items():
            assert after in entry.config.model_fields and before not in entry.config.model_fields
            assert VOCABULARY[after].renamed.get(entry.name) == before, (entry.name, before)
    for name, option in VOCABULARY.items():
        for command, before in option.renamed.items():
            config = next(e.config for e in COMMANDS if e.name == command)
            assert config.RENAMED.get(before) == name, (command, before)


def test_docs_options_page_holds_the_table_the_code_declares():
    page = (ROOT / "docs" / "options.md").read_text()
    assert options_table() in page


def test_auto_device_is_cuda_when_torch_sees_a_gpu_else_cpu_in_every_command():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected and resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
    for entry in COMMANDS:
        if "device" in entry.config.model_fields:
            assert default_of(entry.config.model_fields["device"]) == "auto", entry.name


def test_curate_help_states_the_cluster_count_the_code_uses():
    from curate.config import CurateConfig
    from curate.dedup import default_clusters

    help_text = CurateConfig.model_fields["clusters"].description
    assert "up to 2,000, then min(16000, round(2 * sqrt(N)))" in help_text
    assert "200 at 10,000" in help_text
    assert [default_clusters(n) for n in (2_000, 2_001, 10_000, 10**9)] == [1, 89, 200, 16_000]


# ----------------------------------------------------------------------------- old spellings


def parse(argv: list[str]):
    """The config `t2i ARGV` would run with, and the one-line messages it printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = vars(build_parser().parse_args(argv))
        entry = args.pop("_command")
        config_file = args.pop("_config_file", None)
        for key in ("command", "debug", *entry.positional_names):
            args.pop(key, None)
        config = resolve_config(entry, args, config_file)
    return config, [str(w.message) for w in caught if issubclass(w.category, OptionRenamed)]


DPO = ["dpo", "PREFS", "OUT", "--model", "M"]


def test_old_dpo_flags_still_work_with_a_one_line_deprecation_each():
    old = ["--rank", "8", "--alpha", "4", "--target-modules", "all-linears", "--base-dtype", "bf16"]
    config, messages = parse([*DPO, *old, "--max-sequence-length", "64"])
    assert (config.lora_rank, config.lora_alpha, config.lora_base_dtype) == (8, 4.0, "bf16")
    assert config.lora_targets == TARGET_SETS["all-linears"] and config.t5_length == 64
    assert len(messages) == 5 and all("\n" not in m for m in messages)
    assert "--rank is deprecated, use --lora-rank" in messages[0]
    new = ["--lora-rank", "8", "--lora-alpha", "4", "--lora-targets", "all-linears"]
    new, none = parse([*DPO, *new, "--lora-base-dtype", "bf16", "--t5-length", "64"])
    assert new == config and none == []


def test_old_keys_in_a_config_file_still_work_with_a_one_line_deprecation_each(tmp_path):
    toml = tmp_path / "dpo.toml"
    toml.write_text('model = "M"\nrank = 8\nmax_sequence_length = 64\nresume = false\n')
    config, messages = parse(["dpo", "PREFS", "OUT", "--config", str(toml)])
    assert (config.lora_rank, config.t5_length, config.resume) == (8, 64, None)
    assert len(messages) == 3
    assert f"--config {toml}: key 'rank' is deprecated, use 'lora_rank'" in messages[0]
    assert "resume = false is deprecated, use resume = none" in messages[2]
    with pytest.raises(ValueError, match="same option"):
        toml.write_text('model = "M"\nrank = 8\nlora_rank = 4\n')
        read_config_file(toml, DPOConfig)
    toml.write_text('model = "M"\nmax_sequence_length = 20\n')
    assert parse(["sample", "--config", str(toml)])[0].t5_length == 20


def test_python_and_prefect_callers_may_use_the_old_names_too():
    with pytest.warns(OptionRenamed) as caught:
        config = DPOConfig(model="M", target_modules=["attention"], rank=16)
    assert [str(w.message).split(" is ")[0] for w in caught] == [
        "DPOConfig: key 'rank'",
        "DPOConfig: key 'target_modules'",
    ]
    assert config.lora_targets == TARGET_SETS["attention"] and config.lora_rank == 16
    assert config.lora_alpha is None  # unset = the rank, as dpo's default alpha 128 for rank 128
    with pytest.warns(OptionRenamed):
        assert SampleConfig(model="M", max_sequence_length=20).t5_length == 20


def test_resume_is_a_value_in_train_and_dpo_and_a_bare_flag_means_latest():
    train = ["train", "ENC", "OUT", "--model", "M"]
    assert parse(train)[0].resume is None and parse(DPO)[0].resume == "latest"
    for argv in (train, DPO):
        assert parse([*argv, "--resume"])[0].resume == "latest"
        assert parse([*argv, "--resume", "none"])[0].resume is None
        assert parse([*argv, "--resume", "/ckpt/step-00000002"])[0].resume == "/ckpt/step-00000002"
    config, messages = parse([*DPO, "--no-resume"])
    assert config.resume is None and messages == [
        "--no-resume is deprecated, use --resume none (the old spelling is accepted until the next "
        "release)"
    ]
    assert TrainConfig(model="M", resume="latest").resume == "latest"


def test_the_command_line_prints_one_line_per_old_spelling_and_runs(tmp_path, capsys):
    from flows.cli import main

    toml = tmp_path / "dpo.toml"
    toml.write_text("max_sequence_length = 64\n")
    argv = ["dpo", str(tmp_path / "missing"), str(tmp_path / "out"), "--model", str(tmp_path)]
    assert main([*argv, "--rank", "8", "--config", str(toml)]) == 1  # it ran: no such input
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        "t2i dpo: --rank is deprecated, use --lora-rank (the old spelling is accepted until the "
        "next release)",
        f"t2i dpo: --config {toml}: key 'max_sequence_length' is deprecated, use 't5_length' (the "
        "old spelling is accepted until the next release)",
    ]
    assert "does not exist" in err[2] and len(err) == 3
