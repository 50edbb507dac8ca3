import subprocess
import sys

from flows.cli import build_parser, stage_commands


def t2i(*args):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True
    )


def test_help_lists_every_stage():
    result = t2i("--help")
    assert result.returncode == 0
    for command in stage_commands():
        assert command.name in result.stdout


def test_every_subcommand_explains_itself():
    parser = build_parser()
    for command in stage_commands():
        sub = parser._subparsers._group_actions[0].choices[command.name]
        text = sub.format_help()
        assert command.description.split()[0] in text
        for action in sub._actions:
            if action.dest not in ("help",) and action.option_strings:
                assert action.help, f"t2i {command.name} {action.option_strings[0]} has no help"


def test_a_missing_required_option_is_a_clear_usage_error():
    result = t2i("sample")
    assert result.returncode == 2 and "--model" in result.stderr


def test_sample_writes_pngs(tiny_model_dir, tmp_path):
    result = t2i("sample", "--model", tiny_model_dir, "--prompt", "a red cat", "--steps", "2",
                 "--seed", "1", "2", "--out", str(tmp_path / "s"), "--height", "64", "--width", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 2


def test_a_model_folder_that_is_not_one_is_a_clear_error(tmp_path):
    result = t2i("sample", "--model", str(tmp_path), "--prompt", "x")
    assert result.returncode == 1 and "model_index.json" in result.stderr
