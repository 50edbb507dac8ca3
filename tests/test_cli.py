import errno
import json
import subprocess
import sys
import tarfile
from dataclasses import replace

import pytest

from curate.runtime.output_lock import StageBusy
from curate.runtime.store import StoreError
from flows.cli import build_parser, main
from flows.commands import stage_commands


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
    result = t2i(
        "sample",
        "--model",
        tiny_model_dir,
        "--prompt",
        "a red cat",
        "--steps",
        "2",
        "--seed",
        "1",
        "2",
        "--out",
        str(tmp_path / "s"),
        "--height",
        "64",
        "--width",
        "64",
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 2


def test_a_model_folder_that_is_not_one_is_a_clear_error(tmp_path):
    result = t2i("sample", "--model", str(tmp_path), "--prompt", "x")
    assert result.returncode == 1 and "model_index.json" in result.stderr


# ---- --config FILE.toml ----------------------------------------------------------------------


def test_a_config_file_sets_options_and_flags_override_it(tmp_path):
    from flows.cli import resolve_config
    from flows.commands import command

    path = tmp_path / "sample.toml"
    path.write_text('model = "m"\nprompt = ["a cat", "a dog"]\nsteps = 9\nseed = [1, 2]\n')
    config = resolve_config(command("sample"), {"steps": 3}, str(path))
    assert (config.model, config.prompt, config.seed, config.steps) == (
        "m",
        ["a cat", "a dog"],
        [1, 2],
        3,
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('model = "m"\nstepz = 3\n', "unknown key(s) stepz"),
        ("model = [unclosed\n", "not valid TOML"),
        ('model = "m"\nsteps = "many"\n', "--steps"),
    ],
)
def test_a_bad_config_file_is_a_one_line_usage_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = t2i("sample", "--config", str(path), "--prompt", "x")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_run_repeats_from_the_config_file_it_wrote(demo_folder, tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg"):
        (source / name).write_bytes((demo_folder / name).read_bytes())
    first = tmp_path / "first"
    assert (
        main(
            ["make-prefs", str(first), "--source", str(source), "--strength", "0.3", "--seed", "4"]
        )
        == 0
    )
    written = (first / "config.toml").read_text()
    assert "strength = 0.3" in written and "seed = 4" in written
    again = tmp_path / "again"
    assert main(["make-prefs", str(again), "--config", str(first / "config.toml")]) == 0
    assert (again / "config.toml").read_text() == written
    pairs = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert pairs == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for pair in pairs:
        assert (first / pair).read_bytes() == (again / pair).read_bytes()


# ---- expected failures: one line and a non-zero exit; --debug shows the traceback -----------


def _failing(error: BaseException):
    def run(output, config):
        raise error

    return run


def _validation_error():
    from pydantic import BaseModel

    class Strict(BaseModel):
        size: int

    try:
        Strict(size="big")
    except ValueError as error:
        return error


FAILURES = {
    "disk full": (
        OSError(errno.ENOSPC, "No space left on device", "/out/x"),
        "No space left on device: /out/x",
    ),
    "memory": (MemoryError(), "out of memory"),
    "corrupt tar": (
        tarfile.ReadError("file could not be opened successfully"),
        "ReadError: file could not",
    ),
    "bad json": (
        json.JSONDecodeError("Expecting value", "{", 1),
        "JSONDecodeError: Expecting value",
    ),
    "validation": (_validation_error(), "--size"),
    "missing": (
        FileNotFoundError("input /nowhere does not exist"),
        "input /nowhere does not exist",
    ),
    "value": (ValueError("bad parameter\nsecond line"), "bad parameter second line"),
    "store": (StoreError("x is not a finished stage output"), "x is not a finished stage output"),
    "busy": (
        StageBusy("curate: /o is being written by another run"),
        "being written by another run",
    ),
    "decode": (
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        "UnicodeDecodeError",
    ),
}


@pytest.fixture
def failing_demo_data(monkeypatch):
    import flows.cli as cli

    def install(error):
        table = tuple(
            replace(c, run=_failing(error)) if c.name == "demo-data" else c for c in cli.COMMANDS
        )
        monkeypatch.setattr(cli, "COMMANDS", table)

    return install


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_expected_failure_is_one_line_and_a_non_zero_exit(
    case, failing_demo_data, capsys, tmp_path
):
    error, message = FAILURES[case]
    failing_demo_data(error)
    assert main(["demo-data", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("t2i demo-data: error: "), err
    assert message in err and "Traceback" not in err


def test_debug_shows_the_traceback(failing_demo_data, tmp_path):
    failing_demo_data(tarfile.ReadError("corrupt"))
    with pytest.raises(tarfile.ReadError):
        main(["demo-data", str(tmp_path / "out"), "--debug"])
    with pytest.raises(tarfile.ReadError):
        main(["--debug", "demo-data", str(tmp_path / "out")])


def test_a_real_missing_input_is_one_line_in_a_subprocess(tmp_path):
    result = t2i("prefs", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"t2i prefs: error: preference input {tmp_path / 'nowhere'} does not exist"
    ]
