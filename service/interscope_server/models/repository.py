"""The model repository on disk: one folder per model, names and paths confined to the root."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from interscope_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from interscope_server.models.config import CONFIG_FILE, MODEL_NAME_PATTERN, ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_MEMORY_BUDGET_BYTES = 2048 * 1024 * 1024
#: Marks a folder as written by an upload, so UnloadModel may delete it (never an operator's).
UPLOAD_MARKER = ".uploaded"
_NAME = re.compile(MODEL_NAME_PATTERN)


def validate_model_name(name: str) -> str:
    """`name` if it is a valid model (folder) name, else InvalidArgument saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 characters from letters, digits, '_', '.', "
            "'-', starting with a letter or digit"
        )
    return name


def config_error_message(name: str, exc: ValidationError) -> str:
    """A pydantic validation error as one readable line per problem."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )
    return f"model {name!r}: invalid {CONFIG_FILE}: {problems}"


class ModelRepository:
    """A directory with one folder per model, each holding config.json and the model file.

    Every path it hands out is resolved and checked to lie inside the root, so neither a name,
    a config's `file`, nor a symlink can reach outside it.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise InvalidArgument(f"model repository {str(root)!r} is not a directory")
        self.max_upload_bytes = max_upload_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @contextlib.contextmanager
    def name_lock(self, name: str) -> Iterator[None]:
        """Serialises writers of one model name (uploads, deletes): check, write, load, commit.

        Without it two uploads of one name raced between the exists-check and the rename
        (`Directory not empty`, a non-replace upload replacing another, leftover folders).
        """
        with self._locks_guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            yield

    def names(self) -> list[str]:
        """Sorted names of the folders that hold a config file (valid names only)."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                continue  # build and upload staging folders, lock and stamp files
            if not _NAME.fullmatch(entry.name):
                logger.warning("model repository: skipping %r (not a valid model name)", entry.name)
                continue
            if (entry / CONFIG_FILE).is_file():
                found.append(entry.name)
        return sorted(found)

    def _confined(self, path: Path, what: str) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise InvalidArgument(f"{what} resolves outside the model repository; not allowed")
        return resolved

    def model_dir(self, name: str) -> Path:
        """The model's folder (resolved, inside the root); NotFound if it has no config file."""
        validate_model_name(name)
        folder = self._confined(self.root / name, f"model {name!r}")
        if not (folder / CONFIG_FILE).is_file():
            raise NotFound(
                f"model {name!r} is not in the repository; available: {', '.join(self.names())}"
            )
        return folder

    def read_config(self, name: str) -> ModelConfig:
        """The model's validated config; InvalidArgument says which fields are wrong and why."""
        folder = self.model_dir(name)
        path = self._confined(folder / CONFIG_FILE, f"model {name!r} {CONFIG_FILE}")
        try:
            config = ModelConfig.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise InvalidArgument(config_error_message(name, exc)) from None
        if config.name != name:
            raise InvalidArgument(
                f"model {name!r}: {CONFIG_FILE} names it {config.name!r}; the name must equal "
                "the folder name"
            )
        return config

    def model_file(self, config: ModelConfig) -> Path:
        """The model file of `config` (resolved, inside its folder); InvalidArgument if missing."""
        folder = self.model_dir(config.name)
        path = (folder / config.file).resolve()
        if not path.is_relative_to(folder):
            raise InvalidArgument(
                f"model {config.name!r}: file {config.file!r} resolves outside the model folder; "
                "it must be a file inside it"
            )
        if not path.is_file():
            # The model exists (its folder and config do); it is broken, not missing.
            raise InvalidArgument(
                f"model {config.name!r}: model file {config.file!r} does not exist in its folder"
            )
        return path

    def save_upload(
        self, name: str, model_bytes: bytes, config: ModelConfig, *, replace: bool = False
    ) -> StagedUpload:
        """Write an uploaded model and its config into place; `commit()` or `rollback()` it.

        Call under `name_lock(name)`. The folder appears complete or not at all: it is written to
        a hidden staging folder and renamed into place; a replaced folder is kept aside until
        the new model has loaded, so a rejected upload leaves the repository as it was.
        An existing model is replaced only with `replace=True` (else AlreadyExists).
        """
        validate_model_name(name)
        if config.name != name:
            raise InvalidArgument(f"upload named {name!r} carries a config named {config.name!r}")
        if len(model_bytes) > self.max_upload_bytes:
            raise ResourceExhausted(
                f"model upload of {len(model_bytes)} bytes exceeds the limit of "
                f"{self.max_upload_bytes} bytes"
            )
        target = self._confined(self.root / name, f"model {name!r}")
        if target.exists() and not replace:
            raise AlreadyExists(
                f"model {name!r} already exists in the repository; set replace to overwrite it, "
                "or choose another name"
            )
        staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        aside: Path | None = None
        try:
            model_path = (staging / config.file).resolve()
            if not model_path.is_relative_to(staging.resolve()):
                raise InvalidArgument(f"model file {config.file!r} must lie inside the folder")
            model_path.parent.mkdir(parents=True, exist_ok=True)
            _write_synced(model_path, model_bytes)
            # Only the fields the upload set: the rest stay "read from the model file".
            text = config.model_dump_json(indent=2, exclude_unset=True) + "\n"
            _write_synced(staging / CONFIG_FILE, text.encode())
            _write_synced(staging / UPLOAD_MARKER, b"")
            if target.exists():
                # Swap via a hidden name so the old folder never mixes with the new one.
                aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.root))
                os.replace(target, aside / name)
            os.replace(staging, target)
        except BaseException:
            if aside is not None and (aside / name).exists() and not target.exists():
                os.replace(aside / name, target)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return StagedUpload(target, aside)

    def is_upload(self, name: str) -> bool:
        """Whether the model's folder was written by an upload (and so may be deleted)."""
        return (self.model_dir(name) / UPLOAD_MARKER).is_file()

    def delete_upload(self, name: str) -> None:
        """Remove an uploaded model's folder (call under `name_lock`); FailedPrecondition for a
        folder the operator put there, which the server never deletes."""
        folder = self.model_dir(name)
        if not (folder / UPLOAD_MARKER).is_file():
            raise FailedPrecondition(
                f"model {name!r} was not uploaded (its folder belongs to the operator); "
                "only uploaded models can be deleted"
            )
        # Rename first so the name disappears at once, then remove at leisure.
        hidden = Path(tempfile.mkdtemp(prefix=".deleted-", dir=self.root))
        os.replace(folder, hidden / name)
        shutil.rmtree(hidden, ignore_errors=True)


class StagedUpload:
    """An upload in place whose fate waits on its load: commit keeps it, rollback undoes it."""

    def __init__(self, folder: Path, aside: Path | None) -> None:
        self.folder = folder
        self._aside = aside

    def commit(self) -> None:
        """The new model loaded: drop the replaced folder."""
        if self._aside is not None:
            shutil.rmtree(self._aside, ignore_errors=True)

    def rollback(self) -> None:
        """The new model was refused: remove it, and put back what it replaced."""
        hidden = Path(tempfile.mkdtemp(prefix=".rejected-", dir=self.folder.parent))
        if self.folder.exists():
            os.replace(self.folder, hidden / self.folder.name)
        if self._aside is not None:
            os.replace(self._aside / self.folder.name, self.folder)
            shutil.rmtree(self._aside, ignore_errors=True)
        shutil.rmtree(hidden, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
