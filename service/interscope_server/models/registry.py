"""The model registry: loads models from the repository, tracks their state, hands them out."""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from interscope_server.cancel import CancelToken
from interscope_server.errors import (
    FailedPrecondition,
    InterscopeError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from interscope_server.models.backend import (
    Backend,
    BackendOptions,
    check_batch,
    outputs_are_random,
    value_bounds,
)
from interscope_server.models.batcher import BatcherOptions, DynamicBatcher, ModelObserver
from interscope_server.models.config import ModelConfig
from interscope_server.models.host import HostedBackend, HostOptions
from interscope_server.models.oip_backend import OipBackend
from interscope_server.models.onnx_backend import OnnxBackend
from interscope_server.models.repository import ModelRepository, validate_model_name
from interscope_server.models.torch_export_backend import TorchExportBackend
from interscope_server.models.torchscript_backend import TorchScriptBackend
from interscope_server.models.vetting import vet_model_file

logger = logging.getLogger(__name__)


class ModelState(enum.Enum):
    """Life cycle of one model in the registry."""

    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True)
class ModelStatus:
    """A model's state; `message` explains FAILED (or a failed reload of a READY model)."""

    name: str
    state: ModelState
    message: str = ""
    #: False while a READY remote (format oip) model's server says it is not ready: health then
    #: reports NOT_SERVING, and calls fail with UNAVAILABLE until it recovers.
    serving: bool = True


#: Called with every state change (name, state, message); the server feeds health status from it.
StateListener = Callable[[ModelStatus], None]


def open_backend(
    config: ModelConfig,
    path: Path,
    options: BackendOptions,
    *,
    observer: ModelObserver | None = None,
) -> Backend:
    """The backend for `config.format`, loaded from `path` (for oip: the model's folder)."""
    if config.format == "oip":
        return OipBackend(config, path, on_remote_call=(observer or ModelObserver()).on_remote_call)
    if config.format == "onnx":
        return OnnxBackend(config, path, options)
    if config.format == "torch_export":
        return TorchExportBackend(config, path, options)
    return TorchScriptBackend(config, path, options)


class LoadedModel:
    """A READY model: its config, backend and batcher. `evaluate` is what the engine calls."""

    def __init__(self, backend: Backend, batcher: DynamicBatcher, grace_s: float) -> None:
        self.backend = backend
        self.batcher = batcher
        self._grace_s = grace_s

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def evaluate(self, x: np.ndarray, cancel: CancelToken | None = None) -> np.ndarray:
        """float32 logits (B, num_classes) for raw inputs (B, *input_shape), via the batcher."""
        return self.batcher.submit(check_batch(x, self.config), cancel)

    def close(self, *, drain: bool = True) -> None:
        """Stop serving within the grace: queued calls finish first with `drain`; a forward
        still running after the grace is stopped by closing the backend (a model host is
        killed; an in-process forward cannot be stopped and is left to finish on its thread)."""
        if not self.batcher.close(drain=drain, timeout=self._grace_s):
            logger.warning("model %s busy after %.1f s; stopping it", self.name, self._grace_s)
            self.backend.close()
            if not self.batcher.close(drain=False, timeout=self._grace_s):
                logger.error("model %s: its forward pass runs on in the server", self.name)
        self.backend.close()


class ModelRegistry:
    """Thread-safe map of model name -> state and, when READY, its LoadedModel.

    Loads run in the calling thread (the server calls from a worker thread, never the event
    loop); one model failing to load marks only that model FAILED, with its message.
    """

    def __init__(
        self,
        repository: ModelRepository,
        *,
        backend_options: BackendOptions | None = None,
        batcher_options: BatcherOptions | None = None,
        observer: ModelObserver | None = None,
        listener: StateListener | None = None,
        host_options: HostOptions | None = None,
    ) -> None:
        """`host_options` None runs models in this process (HostOptions(mode="inline"))."""
        self.repository = repository
        self._backend_options = backend_options or BackendOptions()
        self._host_options = host_options or HostOptions(mode="inline")
        self._batcher_options = batcher_options or BatcherOptions()
        self._observer = observer or ModelObserver()
        self._listener = listener
        self._lock = threading.Lock()
        self._status: dict[str, ModelStatus] = {}
        self._models: dict[str, LoadedModel] = {}
        self._closed = False

    def _set(self, status: ModelStatus) -> None:
        """Record a state change (caller holds the lock) and tell the listener."""
        self._status[status.name] = status
        if self._listener is not None:
            try:
                self._listener(status)
            except Exception:  # a broken listener must not break loading
                logger.exception("model state listener failed for %s", status.name)

    def load_all(self, names: Sequence[str] | None = None) -> list[ModelStatus]:
        """Load the listed models (default: every model in the repository); never raises for one.

        Returns the final status of each; FAILED ones carry the reason.
        """
        results = []
        for name in self.repository.names() if names is None else names:
            try:
                self.load(name)
            except InterscopeError as exc:
                logger.error("model %s failed to load: %s", name, exc)
            results.append(self.status(name))
        return results

    def load(self, name: str) -> LoadedModel:
        """Load (or reload) `name` from the repository; raises the reason if it fails."""
        validate_model_name(name)
        with self._lock:
            if self._closed:
                raise Unavailable("the server is stopping; models cannot be loaded now")
            current = self._status.get(name)
            if current is not None and current.state is ModelState.LOADING:
                raise Unavailable(f"model {name!r} is already loading; retry shortly")
            self._set(ModelStatus(name, ModelState.LOADING))
        try:
            config = self.repository.read_config(name)
            path = (
                self.repository.model_dir(name)
                if config.format == "oip"
                else self.repository.model_file(config)
            )
            vet_model_file(config, path, self.repository.memory_budget_bytes)
            backend = self._open(config, path)
            self._probe(backend)
        except Exception as exc:
            message = (
                str(exc) if isinstance(exc, InterscopeError) else f"{type(exc).__name__}: {exc}"
            )
            with self._lock:
                if isinstance(exc, NotFound) and current is None:
                    # Nothing by that name exists: do not invent a FAILED entry for it.
                    del self._status[name]
                elif name in self._models:
                    # A failed reload leaves the previous version serving.
                    self._set(ModelStatus(name, ModelState.READY, f"reload failed: {message}"))
                else:
                    self._set(ModelStatus(name, ModelState.FAILED, message))
            self._observer.on_load(name, "failure")
            if isinstance(exc, InterscopeError):
                raise
            raise InvalidArgument(f"model {name!r} failed to load: {message}") from exc
        batcher = DynamicBatcher(
            name,
            backend.forward_checked,  # evaluate() checked each caller's rows
            num_outputs=backend.num_classes,
            max_batch_size=backend.config.max_batch_size,  # as resolved against the file
            options=self._batcher_options,
            observer=self._observer,
            on_abandoned=backend.abandon_forward,
            direct=backend.forward_until if backend.stops_on_cancel else None,
        )
        model = LoadedModel(backend, batcher, self._host_options.grace_s)
        with self._lock:
            previous = self._models.pop(name, None)
            if self._closed:
                model.close(drain=False)
                raise Unavailable("the server is stopping; models cannot be loaded now")
            self._models[name] = model
            self._set(ModelStatus(name, ModelState.READY))
        if previous is not None:
            previous.close(drain=True)  # requests already queued on the old version finish
        if isinstance(backend, OipBackend):
            backend.watch_readiness(
                lambda ready, message: self._remote_readiness(model, ready, message)
            )
        self._observer.on_load(name, "success")
        logger.info(
            "model %s ready: %s on %s, gradients %s,%s sha256 %s",
            name,
            backend.format,
            backend.device,
            "yes" if backend.gradients_available else f"no ({backend.gradient_note})",
            " stochastic (outputs are random: no profiles)," if backend.stochastic else "",
            backend.content_hash[:12],
        )
        return model

    def _remote_readiness(self, model: LoadedModel, ready: bool, message: str) -> None:
        """A remote model's ModelReady answer changed: mirror it in the status (and health)."""
        with self._lock:
            if self._models.get(model.name) is not model:
                return  # unloaded or replaced since: its status is no longer this backend's
            text = "" if ready else f"remote not ready: {message}"
            self._set(ModelStatus(model.name, ModelState.READY, text, serving=ready))

    def _open(self, config: ModelConfig, path: Path) -> Backend:
        """The model's backend: in a supervised host process, or in this one (inline)."""
        # A remote (oip) model is only a network client: nothing of its runs here to isolate.
        if self._host_options.mode == "inline" or config.format == "oip":
            return open_backend(config, path, self._backend_options, observer=self._observer)
        return HostedBackend(
            config, path, self._backend_options, self._host_options, self._host_failed
        )

    def _host_failed(self, backend: HostedBackend, reason: str) -> None:
        """A model's host was given up (restart failed, or it kept dying): mark it FAILED."""
        name = backend.config.name
        with self._lock:
            model = self._models.get(name)
            if model is None or model.backend is not backend:
                return  # already unloaded or replaced
            del self._models[name]
            self._set(ModelStatus(name, ModelState.FAILED, reason))
        # Not on this (the host's supervisor) thread: closing joins it.
        threading.Thread(
            target=model.close, kwargs={"drain": False}, name=f"close-{name}", daemon=True
        ).start()

    @staticmethod
    def _probe(backend: Backend) -> None:
        """One forward on a blank input, so a model that cannot run fails at load, not later;
        then two of one probe input, recorded once here for every format: whether the
        model's outputs are random."""
        low, _ = value_bounds(backend.config)
        backend.forward(low[None].astype(np.float32))
        backend.stochastic = outputs_are_random(backend)

    def upload(
        self, name: str, model_bytes: bytes, config: ModelConfig, *, replace: bool = False
    ) -> LoadedModel:
        """Save an uploaded model into the repository (size-limited, atomic) and load it; one
        upload per name at a time, and a refused one leaves the repository as it was."""
        with self.repository.name_lock(name):
            with self._lock:
                state = self._status.get(name)
                if replace and state is not None and state.state is ModelState.LOADING:
                    raise Unavailable(f"model {name!r} is loading; retry the upload shortly")
            staged = self.repository.save_upload(name, model_bytes, config, replace=replace)
            try:
                model = self.load(name)
            except BaseException:
                staged.rollback()
                raise
            staged.commit()
            return model

    def unload(self, name: str, *, delete: bool = False) -> None:
        """Stop serving `name`; calls already queued finish first. NotFound if not loaded.

        With `delete`, an uploaded model's folder is removed from the repository as well.
        """
        validate_model_name(name)
        if delete:
            with self.repository.name_lock(name):
                self.repository.is_upload(name)  # NotFound before anything changes
                with contextlib.suppress(NotFound):
                    self.unload(name)
                self.repository.delete_upload(name)
                with self._lock:
                    self._status.pop(name, None)
            return
        with self._lock:
            model = self._models.pop(name, None)
            status = self._status.get(name)
            if model is None and (status is None or status.state is not ModelState.FAILED):
                raise NotFound(f"model {name!r} is not loaded; loaded: {self._ready_names()}")
            self._set(ModelStatus(name, ModelState.UNLOADED))
        if model is not None:
            model.close(drain=True)

    def _ready_names(self) -> str:
        return ", ".join(sorted(self._models)) or "none"

    def get(self, name: str) -> LoadedModel:
        """The READY model; NotFound, Unavailable (loading) or FailedPrecondition (failed)."""
        with self._lock:
            model = self._models.get(name)
            if model is not None:
                return model
            status = self._status.get(name)
            ready = self._ready_names()
        if status is not None and status.state is ModelState.LOADING:
            raise Unavailable(f"model {name!r} is still loading; retry shortly")
        if status is not None and status.state is ModelState.FAILED:
            raise FailedPrecondition(
                f"model {name!r} failed to load: {status.message}; fix it and load it again"
            )
        raise NotFound(f"model {name!r} is not loaded; loaded models: {ready}")

    def status(self, name: str) -> ModelStatus:
        """The model's status; UNLOADED for a repository model never loaded; NotFound otherwise."""
        with self._lock:
            status = self._status.get(name)
        if status is not None:
            return status
        if name in self.repository.names():
            return ModelStatus(name, ModelState.UNLOADED)
        raise NotFound(f"model {name!r} is neither loaded nor in the repository")

    def statuses(self) -> list[ModelStatus]:
        """Every model known: in the repository or seen by the registry, sorted by name."""
        with self._lock:
            known = dict(self._status)
        for name in self.repository.names():
            known.setdefault(name, ModelStatus(name, ModelState.UNLOADED))
        return [known[name] for name in sorted(known)]

    def ready(self) -> list[LoadedModel]:
        """The READY models, sorted by name."""
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]

    def close(self) -> None:
        """Unload everything: queued calls get Unavailable; later loads are refused."""
        with self._lock:
            self._closed = True
            models = list(self._models.items())
            self._models.clear()
            for name, _ in models:
                self._set(ModelStatus(name, ModelState.UNLOADED))
        for _, model in models:
            model.close(drain=False)
