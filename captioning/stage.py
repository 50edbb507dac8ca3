"""`t2i caption IN OUT`: recaption a curated store with a VLM (SD3 Sec. 5.2.2, PixArt-Sigma).

OUT holds every row of IN, all columns kept, plus `caption_synthetic` (the cleaned VLM
caption, or null) and `captioner` (who wrote it: `<model>@<hash>`, the hash covering the
model, prompt, decoding settings, token budget and cleaning rules). A row whose captioning
fails keeps its original caption, gets nulls, and is listed with its reason in `report.md`
and `failures.json`; rows are never dropped.

Work is done in chunks of `chunk_size` rows, each saved to a WorkLog as soon as it is finished.
A worker is sent a chunk's row range and reads the rows from IN itself, so image bytes never
pass from the driver to the workers; only the captions come back. A killed run loses at most the chunk in flight and a rerun continues where it stopped. A
rerun skips ids already captioned by the same captioner (in the work log, or in IN itself when
IN was captioned before); a finished run that left failures keeps its work log, and rerunning
it retries only the failed rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from tqdm.auto import tqdm

from captioning.backends import model_identity
from captioning.chunks import CHUNK_SCHEMA, ChunkTask, build_chunk_worker, caption_chunk
from captioning.cleaning import TokenBudget, make_budget
from captioning.config import CaptionConfig
from captioning.prompts import load_template
from captioning.protocol import settings_from
from curate.runtime.executor import EXECUTION_FIELDS, Setup, executor_for
from curate.runtime.markdown import escape, fenced
from curate.runtime.output_guard import check_output
from curate.runtime.stage_runtime import StageRun, local_path
from curate.runtime.store import (
    Manifest,
    StoreError,
    load_samples,
    params_hash,
    require_store,
)
from curate.runtime.store_writer import WorkLog

STAGE = "caption"
# Options that change how the work is scheduled, never a caption.
VOLATILE = (*EXECUTION_FIELDS, "concurrency", "max_retries", "retry_backoff_s", "timeout_s")
CLEANING_VERSION = 1  # bump when clean_caption/TokenBudget change what they produce
REQUIRED_COLUMNS = ("id", "image")
NEW_COLUMNS = ("caption_synthetic", "captioner")


def captioner_spec(config: CaptionConfig, template: str, budget: TokenBudget) -> dict[str, Any]:
    """Everything that decides what caption a row gets; its hash is the captioner id."""
    return {
        "model": model_identity(config),
        "prompt": template,
        **({"system_prompt": config.system_prompt} if config.system_prompt else {}),
        **({"processor": config.processor_kwargs} if config.processor_kwargs else {}),
        "generation": settings_from(config).as_dict(),
        "budget": {"max_tokens": budget.max_tokens, "counter": budget.name},
        "cleaning": CLEANING_VERSION,
    }


def captioner_id(spec: dict[str, Any]) -> str:
    return f"{spec['model']['name']}@{params_hash(spec)}"


def run_caption(input: str | Path, output: str | Path, config: CaptionConfig) -> Path:
    source, out = Path(input), Path(output)
    try:
        require_store(source)
    except StoreError as error:  # a usage error: say it the way the command line reports them
        raise ValueError(str(error)) from None
    check_output(out, STAGE, {"input": source})  # StageRun checks again, with the model folders
    if config.backend == "openai" and not config.endpoint:
        raise ValueError("--backend openai needs --endpoint URL (e.g. http://127.0.0.1:8000/v1)")
    if config.backend == "openai" and config.processor_kwargs:
        raise ValueError(
            "--processor-kwargs applies to backend transformers; a server takes its own "
            "(`t2i serve-captioner --processor-kwargs`, vLLM's --mm-processor-kwargs)"
        )
    samples = load_samples(source)
    if len(samples) == 0:
        raise ValueError(
            f"{source} holds no samples to caption; see its report (every input may have been rejected)"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in samples.column_names]
    if missing:
        raise ValueError(
            f"{source} has no column(s) {missing}; the caption stage needs id and image"
        )

    template = load_template(config.prompt, config.prompt_file)
    budget = make_budget(config.max_caption_tokens, config.budget_tokenizer)
    spec = captioner_spec(config, template, budget)
    captioner = captioner_id(spec)
    parameters = {**config.model_dump(mode="json"), "captioner": captioner, "captioner_spec": spec}
    reads = {
        "input": source,
        "model": local_path(config.model) if config.backend == "transformers" else None,
        "prompt_file": config.prompt_file,
        "budget_tokenizer": local_path(config.budget_tokenizer),
    }
    with StageRun(out, STAGE, config, reads, parameters=parameters, volatile=VOLATILE) as run:
        finished = Manifest.read(out)
        if run.finished and not finished.counts.get("failed"):
            return run.skip()
        return _caption(run, samples, config, template, budget, captioner, source)


def _caption(
    run: StageRun, samples, config: CaptionConfig, template, budget, captioner, source
) -> Path:
    # Caption chunk by chunk on the configured executor; each finished chunk is saved as it lands.
    log = run.work_log()
    table = samples.with_format("arrow")
    chunks = _chunks(len(samples), config.chunk_size)
    columns = [c for c in ("id", "image", "caption", *NEW_COLUMNS) if c in samples.column_names]
    counts = {"resumed": 0, "captioned": 0, "passthrough": 0}
    setup = Setup(
        build_chunk_worker,
        (config, template, captioner),
        params_hash({"stage": STAGE, "captioner": captioner, **config.model_dump()}),
    )
    store = str(source.resolve())  # every worker opens the input itself
    with tqdm(total=len(samples), unit="row", desc=f"caption ({config.backend})") as bar:

        def planned() -> Iterator[tuple[str, ChunkTask]]:
            for name, start, stop in chunks:
                previous = log.read(name).to_pylist() if log.has(name) else []
                if previous and all(r["error"] is None for r in previous):
                    counts["resumed"] += len(previous)
                    bar.update(len(previous))
                    continue
                yield name, ChunkTask(store, start, stop, tuple(columns), previous)

        with executor_for(config, STAGE) as executor:
            where = executor.describe()
            for result in executor.map(setup, caption_chunk, planned()):
                results, chunk_counts = result.value
                log.write(result.name, pa.Table.from_pylist(results, schema=CHUNK_SCHEMA))
                for name, value in chunk_counts.items():
                    counts[name] += value
                bar.update(len(results))

    # Assemble the output: every input row with its result, a report, the manifest.
    features = samples.features.copy()
    for column in NEW_COLUMNS:
        features[column] = datasets.Value("string")
    failures: list[dict[str, str]] = []
    stats = {"captioned": 0, "failed": 0, "truncated": 0}
    examples: list[dict[str, Any]] = []
    with run.writer() as writer:
        writer.write_samples(_merged(table, chunks, log, failures, stats, examples), features)
        writer.counts.update({"input": len(samples), **stats})
        writer.extra["captioner"] = captioner
        writer.extra["executor"] = where
        writer.extra["this_run"] = {
            "resumed_rows": counts["resumed"],
            "captioned_rows": counts["captioned"],
            "reused_from_input": counts["passthrough"],
        }
        report = _report(source, captioner, template, stats, failures, examples)
        (writer.path / "report.md").write_text(report)
        (writer.path / "failures.json").write_text(json.dumps(failures, indent=1))
    if not failures:  # with failures the log stays, so that a rerun retries only those rows
        log.clear()
    return run.output


def _chunks(rows: int, size: int) -> list[tuple[str, int, int]]:
    return [
        (f"chunk-{k:06d}", k * size, min(rows, (k + 1) * size))
        for k in range(math.ceil(rows / size))
    ]


def _merged(
    table, chunks, log: WorkLog, failures: list, stats: dict, examples: list
) -> Iterator[dict[str, Any]]:
    """Input rows in order, each with its chunk's result; failures and stats collected on the way."""
    for name, start, stop in chunks:
        results = log.read(name).to_pylist()
        for row, result in zip(table[start:stop].to_pylist(), results, strict=True):
            if row["id"] != result["id"]:
                raise RuntimeError(
                    f"work log {log.path} does not match the input at row {row['id']}; delete it and rerun"
                )
            row["caption_synthetic"] = result["caption_synthetic"]
            row["captioner"] = result["captioner"]
            if result["error"] is not None:
                failures.append({"id": row["id"], "reason": result["error"]})
                stats["failed"] += 1
            else:
                stats["captioned"] += 1
                stats["truncated"] += int(result["truncated"])
                if len(examples) < 5:
                    examples.append({"caption": row.get("caption"), **result})
            yield row


def _report(
    source: Path, captioner: str, template: str, stats: dict, failures: list, examples: list
) -> str:
    lines = [
        "# Caption stage report",
        "",
        f"- input: {escape(source)}",
        f"- captioner: {escape(captioner)}",
        f"- captioned: {stats['captioned']}, failed: {stats['failed']}, "
        f"cut to the token budget: {stats['truncated']}",
        "",
        "## Prompt template",
        "",
        *fenced(template),
        "",
        "## Examples",
        "",
        "| id | original | raw answer | synthetic |",
        "| --- | --- | --- | --- |",
    ]
    for ex in examples:
        cells = [
            ex["id"][:12],
            ex.get("caption") or "",
            ex.get("raw") or "",
            ex["caption_synthetic"] or "",
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", f"## Failed rows ({len(failures)})", ""]
    if failures:
        lines += [
            "These rows keep their original caption and have no synthetic one.",
            "",
            "| id | reason |",
            "| --- | --- |",
        ]
        lines += [f"| {_cell(f['id'])} | {_cell(f['reason'])} |" for f in failures]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """A table cell from data (captions, VLM answers, ids): inert markdown, one line."""
    return escape(text, 300)
