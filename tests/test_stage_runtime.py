"""The stage contract (curate/runtime/stage_runtime.py): lock, fingerprints of everything read, skip,
config.toml, the input = kept + rejected check; and, for every runner, that it skips finished
work and is refused while another process holds its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from PIL import Image
from pydantic import BaseModel, Field
from train_sets import shapes_encoded

from curate.runtime.config_file import read_config_file
from curate.runtime.output_lock import LOCK_WAIT_ENV, StageBusy, lock_path
from curate.runtime.seeds import seed_int, seed_unit
from curate.runtime.stage_runtime import StageRun, UnbalancedOutput
from curate.runtime.store import Manifest, Rejection, load_samples

ROOT = Path(__file__).resolve().parents[1]
FEATURES = datasets.Features({"id": datasets.Value("string")})


class Toy(BaseModel):
    threshold: float = Field(0.5, description="a threshold")
    workers: int = Field(1, description="how many workers")
    names: list[str] = Field(default_factory=lambda: ["a", "b"], description="names")
    model: str | None = Field(None, description="a model folder")


def toy_stage(out: Path, config: Toy, source: Path, kept: int = 2, rejected: int = 1) -> bool:
    """A stage on the contract; True when it did the work, False when it skipped."""
    reads = {"input": source, "model": config.model}
    with StageRun(out, "toy", config, reads, volatile=("workers",)) as run:
        if run.finished:
            run.skip()
            return False
        with run.writer() as writer:
            writer.write_samples(({"id": f"k{i}"} for i in range(kept)), FEATURES)
            writer.write_rejected(Rejection(f"r{i}", "toy", "bad") for i in range(rejected))
            writer.counts["input"] = 3
    return True


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("one record")
    return folder


def test_a_finished_output_is_skipped_until_what_it_read_changes(tmp_path, source):
    out, model = tmp_path / "out", tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w1")
    config = Toy(model=str(model))
    assert toy_stage(out, config, source) is True
    assert toy_stage(out, config, source) is False
    assert toy_stage(out, config.model_copy(update={"workers": 4}), source) is False  # volatile
    assert toy_stage(out, config.model_copy(update={"threshold": 0.7}), source) is True
    (model / "weights.bin").write_bytes(b"w2 retrained")  # a model folder it reads changed
    assert toy_stage(out, config.model_copy(update={"threshold": 0.7}), source) is True
    manifest = Manifest.read(out)
    assert manifest.counts == {"input": 3, "kept": 2, "rejected": 1}
    assert set(manifest.extra["reads"]) == {"input", "model"}


def test_the_resolved_config_is_written_beside_the_output_and_reads_back(tmp_path, source):
    config = Toy(threshold=0.25, names=["x", 'q"uote'])
    toy_stage(tmp_path / "out", config, source)
    values = read_config_file(tmp_path / "out" / "config.toml", Toy)
    assert Toy(**values) == config


def test_a_commit_where_input_is_not_kept_plus_rejected_is_refused(tmp_path, source):
    out = tmp_path / "out"
    with pytest.raises(UnbalancedOutput, match="input 3 != kept 2 \\+ rejected 0"):
        toy_stage(out, Toy(), source, kept=2, rejected=0)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_a_missing_input_is_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy: input .* does not exist"):
        toy_stage(tmp_path / "out", Toy(), tmp_path / "nowhere")


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, b"test holder")
print("locked", flush=True)
sys.stdin.readline()
"""


class Holder:
    """Another process holding OUT's lock until released."""

    def __init__(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock_path(out.resolve()))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            self.process.wait(timeout=30)


@pytest.fixture
def hold():
    holders: list[Holder] = []

    def start(out: Path) -> Holder:
        holders.append(Holder(out))
        return holders[-1]

    yield start
    for holder in holders:
        holder.release()


def test_a_held_output_is_refused_in_one_line_or_waited_for(tmp_path, source, hold, monkeypatch):
    out = tmp_path / "out"
    holder = hold(out)
    monkeypatch.setenv(LOCK_WAIT_ENV, "0")
    with pytest.raises(StageBusy, match="being written by another run \\(test holder\\)"):
        toy_stage(out, Toy(), source)
    monkeypatch.setenv(LOCK_WAIT_ENV, "0.5")
    with pytest.raises(StageBusy, match="after 0.5 s"):
        toy_stage(out, Toy(), source)
    assert not out.exists()
    holder.release()
    assert toy_stage(out, Toy(), source) is True


def test_seed_helpers_are_pure_functions_of_their_parts():
    assert seed_int(0, "noise", 3) == seed_int(0, "noise", 3) != seed_int(0, "noise", 4)
    assert 0 <= seed_int(7, "x") < 2**63
    draws = [seed_unit(1, "val", i) for i in range(2000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03


# ---- every runner: skips its finished work, and is refused while its output is held ----------


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (48, 40), colour).save(path)


@pytest.fixture(scope="module")
def kit(tmp_path_factory, tiny_model_dir, tiny_captioner_dir, make_caption_store, demo_folder):
    """Small inputs for every runner, and the encoded set `t2i train` reads."""
    root = tmp_path_factory.mktemp("runtime-kit")
    images = root / "images"
    images.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):
        (images / name).write_bytes((demo_folder / name).read_bytes())
        (images / name).with_suffix(".txt").write_text(f"a photo, {name}")
    pairs = root / "pairs"
    for k, (good, bad) in enumerate(
        (((200, 90, 40), (40, 90, 200)), ((230, 60, 60), (60, 60, 230)))
    ):
        (pairs / f"p{k}").mkdir(parents=True)
        _png(pairs / f"p{k}" / "winner.png", good)
        _png(pairs / f"p{k}" / "loser.png", bad)
        (pairs / f"p{k}" / "caption.txt").write_text("a warm square\n")
    encoded, _ = shapes_encoded(tiny_model_dir, root / "shapes", 8)
    truth = json.loads((demo_folder / "DEMO_TRUTH.json").read_text())
    decodable = [key for key, t in truth.items() if t["expect"] == "keep"][:4]
    return {
        "images": images,
        "pairs": pairs,
        "encoded": encoded,
        "model": tiny_model_dir,
        "captioner": tiny_captioner_dir,
        "store": make_caption_store(root / "store", decodable),
    }


def runner(name: str, kit: dict, out: Path):
    """A call of the stage's runner on the kit's small inputs, writing OUT."""
    if name == "curate":
        from curate.config import CurateConfig
        from curate.stage import run_curate

        config = CurateConfig(nsfw_detector="none", aesthetic_scorer="none", workers=1)
        return lambda: run_curate(kit["images"], out, config)
    if name == "caption":
        from captioning.config import CaptionConfig
        from captioning.stage import run_caption

        config = CaptionConfig(model=kit["captioner"], max_new_tokens=4, max_caption_tokens=8)
        return lambda: run_caption(kit["store"], out, config)
    if name == "precompute":
        from model.config import PrecomputeConfig
        from model.precompute import run_precompute

        config = PrecomputeConfig(model=kit["model"], resolution=32, t5_length=16)
        return lambda: run_precompute(kit["store"], out, config)
    if name == "train":
        from model.config import TrainConfig
        from model.train import run_train

        quick = dict(max_steps=2, batch_size=2, warmup_steps=1, val_every=0, sample_every=0)
        config = TrainConfig(model=kit["model"], checkpoint_every=0, val_fraction=0.25, **quick)
        return lambda: run_train(str(kit["encoded"]), str(out), config)
    if name == "prefs":
        from dpo.config import IngestPrefsConfig
        from dpo.ingest import run_prefs

        return lambda: run_prefs(str(kit["pairs"]), str(out), IngestPrefsConfig())
    if name == "make-prefs":
        from dpo.config import MakePrefsConfig
        from dpo.synthetic import run_make_prefs

        return lambda: run_make_prefs(str(out), MakePrefsConfig(source=str(kit["images"])))
    if name == "dpo":
        from dpo.config import DPOConfig
        from dpo.trainer import run_dpo

        quick = dict(
            lora_rank=2, lora_alpha=2, batch_size=2, max_steps=1, resolution=32, checkpoint_every=1
        )
        config = DPOConfig(model=kit["model"], heldout_fraction=0.0, **quick)
        return lambda: run_dpo(kit["pairs"], out, config)
    if name == "sample":
        from model.config import SampleConfig
        from model.sampling import run_sample

        size = dict(height=32, width=32)
        config = SampleConfig(
            model=kit["model"], prompt=["a cat"], seed=[1], steps=1, out=str(out), **size
        )
        return lambda: run_sample(config.out, config)
    raise AssertionError(name)


RUNNERS = ["curate", "caption", "precompute", "train", "prefs", "make-prefs", "dpo", "sample"]


@pytest.mark.parametrize("name", RUNNERS)
def test_every_runner_skips_its_finished_output(name, kit, tmp_path, capsys):
    out = tmp_path / "out"
    run = runner(name, kit, out)
    assert Path(run()).resolve() == out.resolve()
    manifest = Manifest.read(out)
    assert manifest is not None and manifest.stage == name
    assert (out / "config.toml").is_file()
    if "input" in manifest.counts:
        counts = manifest.counts
        assert counts["input"] == counts["kept"] + counts["rejected"]
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    assert Path(run()).resolve() == out.resolve()
    assert "skipped" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("name", RUNNERS)
def test_every_runner_is_refused_while_another_process_writes_its_output(
    name, kit, tmp_path, hold, monkeypatch
):
    out = tmp_path / "out"
    hold(out)
    monkeypatch.setenv(LOCK_WAIT_ENV, "0")
    with pytest.raises(StageBusy, match="being written by another run"):
        runner(name, kit, out)()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in (".out.lock",)]


def test_two_concurrent_curate_runs_on_one_output_leave_one_finished_output(kit, tmp_path, hold):
    """Both runs start while a third process holds OUT; when it lets go, one run curates and
    the other waits for it, then finds the output finished and skips."""
    out = tmp_path / "curated"
    holder = hold(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "flows.cli", "curate", str(kit["images"]), str(out)]
    argv += ["--nsfw-detector", "none", "--aesthetic-scorer", "none", "--workers", "1"]
    runs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for i, run in enumerate(runs):  # each says it is waiting for the holder
        while "waiting" not in (line := run.stderr.readline()):
            assert line, f"run {i} ended while the output was held: {run.communicate()}"
    holder.release()
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], results
    assert sum("skipped" in err for _, err in results) == 1, results
    manifest = Manifest.read(out)
    counts = manifest.counts
    assert counts["input"] == 3 == counts["kept"] + counts["rejected"]
    assert sorted(load_samples(out)["source"]) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".curated.")]
    assert leftovers == [], leftovers  # the lock file goes with the last holder
