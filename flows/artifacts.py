"""What a stage shows in the Prefect UI, read from the directory it wrote.

Per stage: a table of the manifest's counts, a table of rejection reasons, a markdown artifact
with the stage's report and its images (contact sheets, histograms, sample grids, samples;
embedded as data URIs, since the UI cannot read the worker's disk), and, where the stage logged
scalars (TensorBoard events or JSON lines), a metrics table and a loss-curve image.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import Counter
from pathlib import Path

from PIL import Image
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from curate.runtime.markdown import escape  # every value from data or a path is inert markdown
from curate.runtime.store import REJECTED, Manifest
from flows.progress import artifact_key

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
PREFERRED = ("contact", "sheet", "grid", "hist", "loss", "curve")
MAX_IMAGES = 12
THUMBNAIL = 384
MAX_TABLE_ROWS = 50
log = logging.getLogger(__name__)


def data_uri(path_or_image: Path | Image.Image, size: int = THUMBNAIL) -> str:
    image = Image.open(path_or_image) if isinstance(path_or_image, Path) else path_or_image
    image = image.convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _readable(path: Path) -> bool:
    """Input folders hold broken and hostile files on purpose; show only images that decode."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > 64_000_000:
                return False
            image.load()
        return True
    except Exception:
        return False


def stage_images(output: Path) -> list[Path]:
    """Images a stage wrote beside its tables, the named plots and sheets first."""
    found = [
        p
        for p in output.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(
            part.startswith(".") or part in ("samples", REJECTED)
            for part in p.relative_to(output).parts[:-1]
        )
    ][: MAX_IMAGES * 4]
    found.sort(
        key=lambda p: (not any(word in p.name.lower() for word in PREFERRED), len(p.parts), str(p))
    )
    return [p for p in found if _readable(p)][:MAX_IMAGES]


def rejection_table(output: Path) -> list[dict]:
    path = output / REJECTED
    if not path.exists():
        return []
    import datasets

    rejected = datasets.load_from_disk(str(path))
    if rejected.num_rows == 0:
        return []
    reasons = Counter(rejected["reason"])
    stages = dict(zip(rejected["reason"], rejected["stage"], strict=True))
    return [{"reason": r, "stage": stages[r], "count": n} for r, n in reasons.most_common()]


def read_scalars(output: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars a stage logged: its TensorBoard event files, else its JSON-lines files with a `step`."""
    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(output.rglob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    # JSON lines where no TensorBoard log holds the rows (`t2i dpo` writes both, the same rows)
    for lines in sorted(output.rglob("*.jsonl")) if not series else []:
        if any(part.startswith(".") for part in lines.relative_to(output).parts):
            continue
        for index, line in enumerate(lines.read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            step = int(row.get("step", index))
            for tag, value in row.items():
                if (
                    tag != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    series.setdefault(tag, []).append((step, float(value)))
    return {tag: sorted(points) for tag, points in series.items() if points}


def metrics_table(series: dict[str, list[tuple[int, float]]]) -> list[dict]:
    steps = sorted({step for points in series.values() for step, _ in points})
    if len(steps) > MAX_TABLE_ROWS:  # evenly spaced rows, always the last one
        stride = len(steps) / MAX_TABLE_ROWS
        steps = sorted({steps[int(i * stride)] for i in range(MAX_TABLE_ROWS)} | {steps[-1]})
    lookup = {tag: dict(points) for tag, points in series.items()}
    return [
        {
            "step": step,
            **{tag: round(lookup[tag][step], 6) for tag in series if step in lookup[tag]},
        }
        for step in steps
    ]


def loss_curve(series: dict[str, list[tuple[int, float]]], title: str) -> Image.Image | None:
    losses = {tag: points for tag, points in series.items() if "loss" in tag.lower()}
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for tag, points in losses.items():
        axis.plot(
            [s for s, _ in points],
            [v for _, v in points],
            label=tag,
            marker="." if len(points) < 30 else None,
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer)


def stage_markdown(
    stage: str, output: Path, manifest: Manifest | None, curve: Image.Image | None
) -> str:
    lines = [f"# {escape(stage)}", "", f"Output: {escape(output)}", ""]
    if manifest is not None:
        counts = ", ".join(f"{escape(k)}: {escape(v)}" for k, v in manifest.counts.items())
        lines += [f"Counts: {counts or 'none'}; wall time {manifest.wall_time_s:.1f} s", ""]
    report = output / "report.md"
    if report.is_file():
        text = report.read_text()
        for image in stage_images(output):  # the report's relative image links become data URIs
            text = text.replace(f"({image.relative_to(output).as_posix()})", f"({data_uri(image)})")
        lines += [text, ""]
    if curve is not None:
        lines += ["## Loss", "", f"![loss curve]({data_uri(curve, 800)})", ""]
    images = stage_images(output)
    if images:
        lines += ["## Images", ""]
        lines += [
            f"**{escape(p.relative_to(output))}**\n\n![{escape(p.name)}]({data_uri(p)})\n"
            for p in images
        ]
    return "\n".join(lines)


def publish_stage(stage: str, output: str | Path) -> None:
    """Create the stage's artifacts in the current flow run (no-op outside one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return
    output = Path(output)
    key = artifact_key(stage)
    manifest = Manifest.read(output) if output.is_dir() else None
    if manifest is not None:
        counts = [{"count": name, "value": value} for name, value in manifest.counts.items()]
        create_table_artifact(
            counts or [{"count": "none", "value": 0}],
            key=f"{key}-counts",
            description=f"{stage}: counts from {output}/manifest.json",
        )
        reasons = rejection_table(output)
        create_table_artifact(
            reasons or [{"reason": "(none rejected)", "stage": stage, "count": 0}],
            key=f"{key}-rejections",
            description=f"{stage}: rejections by reason",
        )
    series = read_scalars(output) if output.is_dir() else {}
    if series:
        create_table_artifact(
            metrics_table(series),
            key=f"{key}-metrics",
            description=f"{stage}: logged metrics by step",
        )
    curve = loss_curve(series, f"{stage} loss") if series else None
    create_markdown_artifact(
        stage_markdown(stage, output, manifest, curve),
        key=f"{key}-report",
        description=f"{stage}: report, images and loss curve",
    )


def publish_gallery(label: str, output: Path, images: list[Path]) -> None:
    """One markdown artifact showing images written by several tasks (e.g. sample shards)."""
    lines = [f"# {escape(label)}", "", f"Output: {escape(output)} ({len(images)} images)", ""]
    lines += [
        f"**{escape(p.relative_to(output))}**\n\n![{escape(p.name)}]({data_uri(p, 256)})\n"
        for p in images[: MAX_IMAGES * 2]
    ]
    create_markdown_artifact(
        "\n".join(lines), key=f"{artifact_key(label)}-gallery", description=f"{label}: images"
    )
