"""A deployment's output at rest, in chunks: one row per block of lines, not per line.

A chunk is one row of :data:`~deploy_core.server.db.deploy_log_chunks`: consecutive lines of
one stream and stage with one timestamp, joined by newlines, as an agent sends them in a
:class:`~deploy_core.models.LogBlock`.  A 10 MiB log is then a few hundred rows instead of
hundreds of thousands, which is what the server spent its time on while the agent held a
flooding script back.

Every line keeps an id of its own, unique within its deployment and increasing in output
order (the API's ``id`` and ``after``): a chunk holds lines ``first_line`` to ``first_line +
line_count - 1``, and the next chunk starts where it ends.  Rows stored one per line before
revision 0006 became chunks of one line and kept their ids.

A chunk's text splits back into exactly ``line_count`` lines with ``text.split("\\n",
line_count - 1)``: only the last line of a chunk may hold a newline of its own (a
:class:`~deploy_core.models.LogLine` of an older agent), so such a line ends its chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from deploy_core.server.db import bulk_insert, deploy_log_chunks
from deploy_core.server.rows import LogLineRow

CHUNK_COLUMNS = ("deploy_id", "first_line", "line_count", "ts", "stream", "stage", "text")
# Chunks read per query at first when reading lines; doubled each query of the same read, so
# a page of one-line chunks (stored before 0006) takes a few queries and a page of big ones
# reads little more than it shows.
FIRST_READ = 8
# Entries join a chunk only while it stays within a LogBlock's size.
MAX_CHUNK_CHARS = 256 * 1024

# (ts, stream, stage, lines): lines that arrived together, in order.
Entry = tuple[float, str, str, Sequence[str]]

_c = deploy_log_chunks.c


def next_line_id(conn: Connection, deploy_id: str) -> int:
    """The id the deployment's next stored line gets (1 for the first)."""
    end = conn.execute(
        sa.select(_c.first_line + _c.line_count)
        .where(_c.deploy_id == deploy_id)
        .order_by(_c.first_line.desc())
        .limit(1)
    ).scalar()
    return int(end) if end is not None else 1


def append(conn: Connection, deploy_id: str, entries: Sequence[Entry]) -> None:
    """Store ``entries`` after the deployment's stored lines, one chunk per entry (entries
    with the same timestamp, stream and stage in a row, such as single lines sent together,
    share one up to :data:`MAX_CHUNK_CHARS`).  Only an entry's last line may hold a newline.
    The caller holds the deployment's row lock, so ids are not raced for."""
    if not entries:
        return
    first = next_line_id(conn, deploy_id)
    rows: list[list[Any]] = []
    open_chunk: list[Any] | None = None  # the last row, while lines may still join it
    for ts, stream, stage, lines in entries:
        if not lines:
            continue
        text = "\n".join(lines)
        if (
            open_chunk is not None
            and open_chunk[3:6] == [ts, stream, stage]
            and len(open_chunk[6]) + 1 + len(text) <= MAX_CHUNK_CHARS
        ):
            open_chunk[2] += len(lines)
            open_chunk[6] += "\n" + text
        else:
            open_chunk = [deploy_id, first, len(lines), ts, stream, stage, text]
            rows.append(open_chunk)
        first += len(lines)
        if "\n" in lines[-1]:
            open_chunk = None  # such a line can only be the last of its chunk
    bulk_insert(conn, deploy_log_chunks, CHUNK_COLUMNS, [tuple(row) for row in rows])


def read(conn: Connection, deploy_id: str, *, after: int, limit: int) -> list[LogLineRow]:
    """At most ``limit`` lines of a deployment with an id above ``after``, in order."""
    lines: list[LogLineRow] = []
    for chunk in _chunks_from(conn, deploy_id, after, limit):
        first = chunk.first_line
        skip = max(0, after + 1 - first)
        end = min(chunk.line_count, skip + limit - len(lines))
        # Split no further than the page needs: a page of a big chunk costs its own lines.
        texts = chunk.text.split("\n", end if end < chunk.line_count else end - 1)
        for offset in range(skip, end):
            lines.append(
                LogLineRow(
                    id=first + offset,
                    deploy_id=deploy_id,
                    ts=chunk.ts,
                    stream=chunk.stream,
                    stage=chunk.stage,
                    line=texts[offset],
                )
            )
        if len(lines) >= limit:
            break
    return lines


def _chunks_from(conn: Connection, deploy_id: str, after: int, limit: int) -> Iterator[Any]:
    """The chunks that hold lines above ``after``, in order: the one ``after`` falls in,
    then the following ones, read in growing batches (of at most ``limit``: each chunk
    holds a line at least) while the caller wants more."""
    holding_after = (
        sa.select(sa.func.max(_c.first_line))
        .where(_c.deploy_id == deploy_id, _c.first_line <= after)
        .scalar_subquery()
    )
    where = _c.first_line >= sa.func.coalesce(holding_after, 0)
    batch = FIRST_READ
    while True:
        rows = conn.execute(
            sa.select(_c.first_line, _c.line_count, _c.ts, _c.stream, _c.stage, _c.text)
            .where(_c.deploy_id == deploy_id, where)
            .order_by(_c.first_line)
            .limit(min(batch, limit))
        ).all()
        yield from rows
        if len(rows) < min(batch, limit):
            return
        where = _c.first_line > rows[-1].first_line
        batch *= 2
