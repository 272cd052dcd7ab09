"""Merging sharded audits: the checkpoints of every shard into the report of the whole dataset.

Each shard of a sharded audit (`Client.audit(shard=(i, n))`, `interscope audit --shards n`) writes
a checkpoint whose header names the model, its classes, the shard and its sample ids. Merging
needs no server: it checks that the shards belong to one audit and are all there and complete,
puts the samples back in dataset order and computes the summary exactly as an unsharded audit
does, so the two are equal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interscope._checkpoint import read_checkpoint
from interscope._exceptions import CheckpointError
from interscope._models import AuditReport, SampleResult
from interscope._summary import summarize
from interscope.v1 import analysis_pb2


@dataclass
class _Shard:
    path: Path
    header: dict[str, Any]
    results: dict[str, analysis_pb2.SampleResult]

    @property
    def index(self) -> int:
        return int(self.header["shard"]["index"]) if self.header.get("shard") else 0

    @property
    def count(self) -> int:
        return int(self.header["shard"]["count"]) if self.header.get("shard") else 1

    @property
    def total(self) -> int:
        shard = self.header.get("shard")
        return int(shard["total"]) if shard else len(self.header["sample_ids"])


def checkpoint_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The checkpoint files named, a directory standing for every *.jsonl inside it."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files.extend(sorted(path.glob("*.jsonl")))
        elif path.is_file():
            files.append(path)
        else:
            raise CheckpointError(f"{path} is neither a checkpoint file nor a directory")
    if not files:
        raise CheckpointError(f"no checkpoint files in {', '.join(map(str, paths))}")
    return files


def _read(path: Path) -> _Shard:
    header, results, _ = read_checkpoint(path)
    if header is None:
        raise CheckpointError(f"{path} is empty: its audit never started")
    missing = [k for k in ("model", "classes", "sample_ids") if k not in header]
    if missing:
        raise CheckpointError(
            f"{path} was written by an older interscope without {', '.join(missing)} in its "
            "header; merging needs them: rerun that shard with a fresh checkpoint"
        )
    return _Shard(path, header, results)


def merge_audits(paths: Sequence[str | os.PathLike[str]]) -> list[AuditReport]:
    """One AuditReport per audit among the checkpoints (directories: every *.jsonl inside).

    Checkpoints of one audit share its fingerprint (config and model content hash). Each audit
    must have every shard exactly once, each shard complete; CheckpointError says what is
    missing otherwise (rerun that shard: it resumes from its checkpoint). Reports come sorted by
    model name.
    """
    groups: dict[str, list[_Shard]] = {}
    for path in checkpoint_files(paths):
        shard = _read(path)
        groups.setdefault(str(shard.header["fingerprint"]), []).append(shard)
    reports = [_merge(fp, shards) for fp, shards in groups.items()]
    return sorted(reports, key=lambda r: (r.model, r.fingerprint))


def _merge(fp: str, shards: list[_Shard]) -> AuditReport:
    first = shards[0]
    what = f"audit of {first.header['model']!r} ({fp[:19]}...)"
    layout = {(s.count, s.total) for s in shards}
    if len(layout) != 1:
        raise CheckpointError(
            f"{what}: its checkpoints disagree on the sharding (count, total): {sorted(layout)}"
        )
    count, total = layout.pop()
    by_index: dict[int, _Shard] = {}
    for shard in shards:
        if shard.index in by_index:
            raise CheckpointError(
                f"{what}: shard {shard.index} appears twice ({by_index[shard.index].path} and "
                f"{shard.path}); keep one"
            )
        by_index[shard.index] = shard
    absent = sorted(set(range(count)) - set(by_index))
    if absent:
        raise CheckpointError(
            f"{what}: shards {absent} of {count} are missing; run them (or point at their "
            "checkpoints) and merge again"
        )
    ordered: list[SampleResult | None] = [None] * total
    for index, shard in sorted(by_index.items()):
        ids = [str(i) for i in shard.header["sample_ids"]]
        unfinished = [i for i in ids if i not in shard.results]
        if unfinished:
            raise CheckpointError(
                f"{what}: shard {index} ({shard.path}) has {len(ids) - len(unfinished)} of "
                f"{len(ids)} samples; rerun it to finish (it resumes from the checkpoint)"
            )
        # Shard `index` holds dataset positions index, index + count, ... in its id order.
        positions = range(index, total, count)
        if len(ids) != len(positions):
            raise CheckpointError(
                f"{what}: shard {index} lists {len(ids)} samples; {len(positions)} expected"
            )
        for position, sample_id in zip(positions, ids, strict=True):
            ordered[position] = SampleResult.from_proto(shard.results[sample_id])
    samples = [s for s in ordered if s is not None]
    if len({s.id for s in samples}) != total:
        raise CheckpointError(f"{what}: the shards repeat sample ids; they cannot be merged")
    n_players = next(
        (
            s.perturbation.clean.n_players
            for s in samples
            if s.perturbation is not None and s.perturbation.clean is not None
        ),
        0,
    )
    return AuditReport(
        model=str(first.header["model"]),
        model_content_hash=str(first.header.get("model_content_hash", "")),
        fingerprint=fp,
        config=dict(first.header["config"]),
        n_players=n_players,
        samples=samples,
        summary=summarize(
            samples,
            [str(c) for c in first.header["classes"]],
            sorted(float(e) for e in first.header["config"].get("eps_sweep", [])),
        ),
    )
