"""Audit checkpoints: JSON lines, a header with the config fingerprint, one SampleResult a line."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from google.protobuf import json_format

from interscope._exceptions import CheckpointError
from interscope.v1 import analysis_pb2

FORMAT = "interscope-audit-checkpoint/1"


def fingerprint(config: dict[str, Any]) -> str:
    """sha256 of the config as canonical JSON: equal configs, equal fingerprints."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def data_fingerprint(
    ids: Sequence[str], x: np.ndarray, y: np.ndarray, targets: np.ndarray | None
) -> str:
    """sha256 of the audit's data: ids, inputs (as the float32 sent), labels and targets.

    Without it a rerun with other inputs under the same config reused the old results and
    reported a wrong robust accuracy.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(list(ids)).encode())
    inputs = np.ascontiguousarray(x, dtype=np.float32)
    digest.update(json.dumps(list(inputs.shape)).encode())
    digest.update(inputs.tobytes())
    digest.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    if targets is not None:
        digest.update(b"targets")
        digest.update(np.ascontiguousarray(targets, dtype=np.int64).tobytes())
    return "sha256:" + digest.hexdigest()


class Checkpoint:
    """An append-only record of finished samples; reopening it yields what is already done.

    Each result is written as one line and flushed at once, so a crash loses at most the line
    being written; a torn last line is cut off on reopening, so that sample is simply redone.
    """

    def __init__(self, path: Path, handle: IO[str], done: dict[str, analysis_pb2.SampleResult]):
        self.path = path
        self._handle = handle
        #: Results read back from an earlier run, by sample id.
        self.done = done

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        fp: str,
        config: dict[str, Any],
        extra: dict[str, Any] | None = None,
        data_fp: str = "",
    ) -> Checkpoint:
        """Open or create the checkpoint at `path` for the audit with fingerprint `fp` (config
        and model) over the data with fingerprint `data_fp` (see `data_fingerprint`).

        `extra` goes into a new file's header (what `merge_audits` needs: the model, its classes,
        the shard and its sample ids). Raises CheckpointError if the file belongs to another
        configuration or is not a checkpoint at all (delete it, or pick another path, to start
        over).
        """
        path = Path(path)
        header, done, good_end = read_checkpoint(path)
        if header is not None and header.get("fingerprint") != fp:
            raise CheckpointError(
                f"{path} belongs to an audit with another configuration "
                f"(fingerprint {header.get('fingerprint')}, this audit {fp}); "
                "remove it or choose another checkpoint path"
            )
        if header is not None and header.get("data_fingerprint", "") != data_fp:
            raise CheckpointError(
                f"{path} belongs to an audit of other data: the inputs, labels, targets or "
                f"sample ids differ from this run's (data fingerprint "
                f"{header.get('data_fingerprint')}, this run {data_fp}); its results would be "
                "wrong for these samples: remove it or choose another checkpoint path"
            )
        handle = path.open("a+", encoding="utf-8")
        if good_end == 0:
            handle.truncate(0)
            header = {
                **(extra or {}),
                "format": FORMAT,
                "fingerprint": fp,
                "data_fingerprint": data_fp,
                "config": config,
            }
            handle.write(json.dumps(header, sort_keys=True) + "\n")
            handle.flush()
        else:
            handle.truncate(good_end)
        return cls(path, handle, done)

    def append(self, result: analysis_pb2.SampleResult) -> None:
        record = {"sample": json_format.MessageToDict(result, preserving_proto_field_name=True)}
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_checkpoint(
    path: Path,
) -> tuple[dict[str, Any] | None, dict[str, analysis_pb2.SampleResult], int]:
    """A checkpoint's header (None for a missing or empty file), its results by sample id, and
    the byte offset where its complete lines end (a torn last line lies beyond it)."""
    done: dict[str, analysis_pb2.SampleResult] = {}
    header: dict[str, Any] | None = None
    good_end = 0
    if not path.exists() or path.stat().st_size == 0:
        return None, done, 0
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    offset = 0
    for number, raw in enumerate(lines):
        complete = number < len(lines) - 1  # the part after the last newline is torn
        if not complete:
            break
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            if number == 0:
                raise CheckpointError(f"{path} is not an interscope checkpoint") from None
            raise CheckpointError(f"{path}: line {number + 1} is not JSON") from None
        if number == 0:
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not an interscope checkpoint")
            header = record
        else:
            result = json_format.ParseDict(
                record["sample"], analysis_pb2.SampleResult(), ignore_unknown_fields=True
            )
            done.setdefault(result.id, result)
        offset += len(raw) + 1
        good_end = offset
    return header, done, good_end
