"""Webdataset tar shards as records: members grouped by sample key, links and names that climb out refused, a tar that breaks midway reported."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from curate.records import (
    CAPTION_EXTENSIONS,
    JSON_SIDECAR_MAX,
    IngestOptions,
    Record,
    caption_from,
    dropped,
    refused,
    shard_file,
    shown,
    unsafe,
)
from curate.runtime import reasons
from curate.runtime.cells import NotText
from curate.runtime.decode import Invalid


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (dot + extension).lower()


def webdataset(root: Path, rel: str, options: IngestOptions) -> Iterator[Record]:
    shard, shard_name = shard_file(root, rel)
    shard_name = shown(shard_name)
    members = 0
    try:
        tar = tarfile.open(shard, "r")  # noqa: SIM115 - closed by the `with tar` below
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        yield refused(shard_name, reasons.CORRUPT_SHARD, f"cannot open the tar shard: {error}")
        return
    with tar:
        pending: dict[str, dict[str, tuple[bytes, str]]] = {}
        order: list[str] = []
        seen: dict[str, int] = {}  # member name -> how many times met, for duplicates
        try:
            for member in tar:
                members += 1
                if member.isdir():
                    continue
                name = shown(member.name)
                source = f"{shard_name}/{name}"
                if unsafe(member.name) or not member.isfile():
                    kind = (
                        "absolute or parent-relative path"
                        if unsafe(member.name)
                        else f"{'link' if member.issym() or member.islnk() else 'special'} member"
                    )
                    yield refused(source, reasons.UNSAFE_PATH, f"refused {kind}: {name!r}")
                    continue
                key, extension = _sample_key(name)
                if key in pending and extension in pending[key]:
                    seen[name] = seen.get(name, 1) + 1
                    yield refused(
                        f"{source}#{seen[name]}",
                        reasons.DUPLICATE_MEMBER,
                        f"member {name!r} appears {seen[name]} times in the shard; only the first "
                        "is read",
                    )
                    continue
                if extension not in CAPTION_EXTENSIONS and member.size > options.max_image_bytes:
                    yield refused(
                        source,
                        reasons.TOO_LARGE,
                        f"member {name!r} is {member.size} bytes, over the limit of "
                        f"{options.max_image_bytes} (max_image_bytes); not read",
                    )
                    continue
                if key not in pending:
                    order.append(key)
                    pending[key] = {}
                if extension in CAPTION_EXTENSIONS:
                    limit = (
                        JSON_SIDECAR_MAX
                        if extension.endswith(".json")
                        else options.max_caption_bytes
                    )
                    if member.size > limit:
                        pending[key][extension] = (
                            b"",
                            f"{member.size} bytes, over the limit of {limit} (max_caption_bytes)",
                        )
                        continue
                pending[key][extension] = (tar.extractfile(member).read(), "")
                # webdataset shards keep a sample's files together: flush finished keys early
                while len(order) > 1:
                    yield from _tar_sample(shard_name, order[0], pending.pop(order.pop(0)), options)
            trailing = _trailing_garbage(shard, tar.offset)
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            for key in order:
                yield from _tar_sample(shard_name, key, pending.pop(key), options)
            yield refused(
                shard_name,
                reasons.CORRUPT_SHARD,
                f"the tar shard breaks after {members} member(s): {type(error).__name__}: {error}",
            )
            return
        for key in order:
            yield from _tar_sample(shard_name, key, pending.pop(key), options)
        if trailing:
            yield refused(
                shard_name,
                reasons.CORRUPT_SHARD,
                f"{trailing} byte(s) after member {members} are not tar headers; the rest of the shard is unreadable",
            )


def _trailing_garbage(shard: Path, offset: int) -> int:
    """Non-zero bytes after where tarfile stopped reading (it stops silently at a bad header)."""
    if not shard.is_file():
        return 0
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 16):
            if chunk.strip(b"\0"):
                return size - offset
    return 0


def _tar_sample(
    shard_name: str, key: str, files: dict[str, tuple[bytes, str]], options: IngestOptions
) -> Iterator[Record]:
    caption, refusal, note = "", None, ""
    for extension, (payload, too_big) in files.items():
        if extension not in CAPTION_EXTENSIONS or caption:
            continue
        try:
            if too_big:
                raise Invalid(reasons.BAD_CAPTION, f"{key}{extension} is {too_big}")
            caption = caption_from(f"{key}{extension}", payload, options.max_caption_bytes)
        except NotText as invalid:
            note = dropped(f"caption {key}{extension}", invalid)
        except Invalid as invalid:
            refusal = (invalid.reason, f"caption {key}{extension}: {invalid.detail}")
            break
    for extension, (payload, _) in sorted(files.items()):
        if extension not in CAPTION_EXTENSIONS:
            if refusal is not None:
                yield Record(f"{shard_name}/{key}{extension}", payload, "", *refusal)
            else:
                yield Record(f"{shard_name}/{key}{extension}", payload, caption, caption_note=note)
