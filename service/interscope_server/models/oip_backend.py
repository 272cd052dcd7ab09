"""Remote backend: forward passes as Open Inference Protocol v2 ModelInfer calls to Triton, KServe,
MLServer or TorchServe; black-box only, health from the remote's ModelReady."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from pydantic import ValidationError

from interscope.oip.v2 import grpc_predict_v2_pb2 as pb
from interscope.oip.v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from interscope_server.errors import (
    FailedPrecondition,
    InterscopeError,
    InvalidArgument,
    Unavailable,
)
from interscope_server.models.backend import Backend, normalization_arrays
from interscope_server.models.config import ModelConfig, OipEndpoint

logger = logging.getLogger(__name__)

#: Status codes worth another try: the remote (or the path to it) is briefly gone or overloaded.
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
#: First back-off between retries; doubles each time, capped at _MAX_BACKOFF_S.
_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0
#: Output datatypes we turn into float32 logits without losing what a classifier needs.
_FLOAT_DTYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "FP16": np.dtype("<f2"),
}
#: Typed-contents field holding each float datatype when the server sends no raw bytes.
_CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents"}

#: Called with (model, seconds, outcome) after each ModelInfer; outcome is "ok" or a status name.
RemoteCallHook = Callable[[str, float, str], None]
#: Called with (ready, message) when the remote's ModelReady answer changes.
ReadinessHook = Callable[[bool, str], None]


def _channel(endpoint: OipEndpoint, folder: Path) -> grpc.Channel:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ]
    if endpoint.server_name:
        options.append(("grpc.ssl_target_name_override", endpoint.server_name))
    if not endpoint.secure:
        return grpc.insecure_channel(endpoint.url, options=options)

    def read(name: str | None) -> bytes | None:
        if name is None:
            return None
        path = Path(name) if Path(name).is_absolute() else folder / name
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"oip TLS file {name!r} cannot be read: {exc}") from None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(endpoint.ca_file),
        private_key=read(endpoint.key_file),
        certificate_chain=read(endpoint.cert_file),
    )
    return grpc.secure_channel(endpoint.url, credentials, options=options)


def _metadata(endpoint: OipEndpoint, name: str) -> tuple[tuple[str, str], ...]:
    headers = dict(endpoint.headers)
    if endpoint.token_env:
        token = os.environ.get(endpoint.token_env, "")
        if not token:
            raise InvalidArgument(
                f"model {name!r}: oip token_env {endpoint.token_env!r} is not set or empty"
            )
        headers["authorization"] = f"Bearer {token}"
    return tuple(headers.items())


class OipBackend(Backend):
    """A model on a remote OIP v2 server. `forward` splits a batch into ModelInfer calls of at
    most the remote's batch limit, sends up to `max_concurrency` at once, retries UNAVAILABLE with
    back-off, and checks every answer's shape and datatype before trusting it."""

    def __init__(
        self,
        config: ModelConfig,
        folder: Path,
        *,
        on_remote_call: RemoteCallHook | None = None,
    ) -> None:
        assert config.oip is not None  # ModelConfig guarantees it for format oip
        self.endpoint = config.oip
        self._on_remote_call = on_remote_call
        self._on_ready: ReadinessHook | None = None
        self._headers = _metadata(self.endpoint, config.name)
        self._channel = _channel(self.endpoint, folder)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._pool = ThreadPoolExecutor(
            max_workers=self.endpoint.max_concurrency, thread_name_prefix=f"oip-{config.name}"
        )
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            self._require_ready(config.name)
            metadata = self._call(self._stub.ModelMetadata, self._metadata_request(), "metadata")
            resolved = self._resolve(config, metadata)
        except BaseException:
            self.close()
            raise
        # The remote holds the weights, so the hash names what we call and what it said it is:
        # a changed remote model (other tensors, version list, platform) changes the hash.
        identity = {
            "url": self.endpoint.url,
            "model": self.endpoint.model,
            "version": self.endpoint.version,
            "metadata": _metadata_dict(metadata),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        super().__init__(resolved, folder, content_hash=digest)
        self.gradient_note = (
            "it runs remotely over the Open Inference Protocol, which serves forward passes only"
        )
        self._norm = normalization_arrays(resolved)
        self.ready = True

    # -- Backend interface ----------------------------------------------------------------------

    @property
    def format(self) -> str:
        return "oip"

    @property
    def device(self) -> str:
        return f"remote:{self.endpoint.url}"

    @property
    def gradients_available(self) -> bool:
        return False

    def torch_module(self) -> torch.nn.Module | None:
        return None

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if not self.ready:
            # Health already says NOT_SERVING; fail fast instead of retrying into a dead model.
            raise Unavailable(
                f"model {self.config.name!r}: the remote model {self._remote_name()} is not "
                "ready (ModelReady false at the last health poll); retry later"
            )
        if self._norm is not None:
            mean, std = self._norm
            x = np.ascontiguousarray((x - mean) / std, dtype=np.float32)
        step = self.endpoint.max_batch_size
        chunks = [x[i : i + step] for i in range(0, x.shape[0], step)]
        if len(chunks) == 1:
            return self._infer(chunks[0])
        return np.concatenate(list(self._pool.map(self._infer, chunks)))

    def close(self) -> None:
        self._closed.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._channel.close()

    # -- health ---------------------------------------------------------------------------------

    def watch_readiness(self, on_ready: ReadinessHook) -> None:
        """Poll ModelReady every health_interval_s and report each change of answer."""
        self._on_ready = on_ready
        self._watcher = threading.Thread(
            target=self._watch, name=f"oip-health-{self.config.name}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        while not self._closed.wait(self.endpoint.health_interval_s):
            try:
                # No retries: the next poll is the retry, and a poll must not outlast the interval.
                self._require_ready(self.config.name, retries=0)
                ready, message = True, ""
            except InterscopeError as exc:
                ready, message = False, str(exc)
            if ready != self.ready:
                self.ready = ready
                logger.warning("model %s: remote %s", self.config.name, message or "ready again")
                if self._on_ready is not None and not self._closed.is_set():
                    self._on_ready(ready, message)

    def _require_ready(self, name: str, *, retries: int | None = None) -> None:
        request = pb.ModelReadyRequest(name=self.endpoint.model, version=self.endpoint.version)
        answer = self._call(self._stub.ModelReady, request, "readiness", retries=retries)
        if not answer.ready:
            raise Unavailable(
                f"model {name!r}: the remote model {self._remote_name()} at "
                f"{self.endpoint.url} is not ready (ModelReady false)"
            )

    # -- calls ----------------------------------------------------------------------------------

    def _remote_name(self) -> str:
        version = f" version {self.endpoint.version}" if self.endpoint.version else ""
        return f"{self.endpoint.model!r}{version}"

    def _metadata_request(self) -> pb.ModelMetadataRequest:
        return pb.ModelMetadataRequest(name=self.endpoint.model, version=self.endpoint.version)

    def _call(  # type: ignore[no-untyped-def]  # grpc stubs' callables are untyped
        self, method, request, what: str, *, retries: int | None = None
    ):
        """One unary call with the deadline and headers, retrying UNAVAILABLE with back-off."""
        attempts = 1 + (self.endpoint.retries if retries is None else retries)
        backoff = _BACKOFF_S
        for attempt in range(attempts):
            if self._closed.is_set() and what != "metadata":
                raise Unavailable("the remote backend is closing")
            try:
                return method(request, timeout=self.endpoint.timeout_s, metadata=self._headers)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                if code in _RETRYABLE and attempt + 1 < attempts:
                    # Real back-off between network retries, not test synchronisation.
                    self._closed.wait(backoff)
                    backoff = min(2 * backoff, _MAX_BACKOFF_S)
                    continue
                raise self._error(code, detail, what, attempt + 1) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, code: grpc.StatusCode, detail: str, what: str, tries: int) -> InterscopeError:
        where = f"remote {self.endpoint.url} model {self._remote_name()}"
        said = f"{code.name}: {detail}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(
                f"{what} call to {where} failed after {tries} "
                f"{'try' if tries == 1 else 'tries'} ({said}); retry later"
            )
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Unavailable(f"{where} is overloaded ({said}); retry later")
        # Anything else means the remote refuses what we send: a config mismatch, not a blip.
        return FailedPrecondition(
            f"{where} refused the {what} call ({said}); check the model's oip config"
        )

    def _infer(self, x: np.ndarray) -> np.ndarray:
        request = pb.ModelInferRequest(
            model_name=self.endpoint.model,
            model_version=self.endpoint.version,
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name=self.config.input.name, datatype="FP32", shape=list(x.shape)
                )
            ],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=self.config.output_name)],
            raw_input_contents=[x.astype("<f4", copy=False).tobytes()],
        )
        started = time.perf_counter()
        outcome = "ok"
        try:
            answer = self._call(self._stub.ModelInfer, request, "ModelInfer")
        except InterscopeError as exc:
            outcome = type(exc).__name__
            raise
        finally:
            if self._on_remote_call is not None:
                self._on_remote_call(self.config.name, time.perf_counter() - started, outcome)
        return self._logits(answer, x.shape[0])

    def _logits(self, answer: pb.ModelInferResponse, rows: int) -> np.ndarray:
        """The requested output of a ModelInfer answer as float32 (rows, classes), checked."""
        where = f"remote model {self._remote_name()}"
        names = [o.name for o in answer.outputs]
        if self.config.output_name not in names:
            raise FailedPrecondition(
                f"{where} answered without output {self.config.output_name!r} (outputs: {names})"
            )
        index = names.index(self.config.output_name)
        tensor = answer.outputs[index]
        dtype = _FLOAT_DTYPES.get(tensor.datatype)
        if dtype is None:
            raise FailedPrecondition(
                f"{where} output {tensor.name!r} has datatype {tensor.datatype}; logits must be "
                f"one of {', '.join(_FLOAT_DTYPES)}"
            )
        expected = (rows, self.num_classes)
        if tuple(tensor.shape) != expected:
            raise FailedPrecondition(
                f"{where} output {tensor.name!r} has shape {list(tensor.shape)} for {rows} rows; "
                f"the config promises {list(expected)} ({self.num_classes} classes)"
            )
        count = rows * self.num_classes
        if answer.raw_output_contents:
            if len(answer.raw_output_contents) != len(answer.outputs):
                raise FailedPrecondition(
                    f"{where} sent {len(answer.raw_output_contents)} raw outputs for "
                    f"{len(answer.outputs)} output tensors"
                )
            raw = answer.raw_output_contents[index]
            if len(raw) != count * dtype.itemsize:
                raise FailedPrecondition(
                    f"{where} output {tensor.name!r} holds {len(raw)} bytes; {list(expected)} "
                    f"{tensor.datatype} needs {count * dtype.itemsize}"
                )
            values = np.frombuffer(raw, dtype=dtype)
        else:
            field = _CONTENTS_FIELD.get(tensor.datatype)
            typed = getattr(tensor.contents, field) if field else []
            if len(typed) != count:
                raise FailedPrecondition(
                    f"{where} output {tensor.name!r} holds {len(typed)} values; "
                    f"{list(expected)} needs {count}"
                )
            values = np.asarray(typed, dtype=dtype)
        logits = values.reshape(expected).astype(np.float32)
        if not np.isfinite(logits).all():
            # A NaN or infinity would poison every value computed from it: an error, not a guess.
            raise FailedPrecondition(f"{where} returned non-finite logits")
        return logits

    # -- metadata -------------------------------------------------------------------------------

    def _resolve(self, config: ModelConfig, metadata: pb.ModelMetadataResponse) -> ModelConfig:
        """`config` with the input name and shape filled from ModelMetadata, checked against it."""
        where = f"model {config.name!r}: remote model {self._remote_name()}"
        inputs = list(metadata.inputs)
        name, shape = config.input.name, list(config.input.shape)
        if not name:
            if len(inputs) != 1:
                raise InvalidArgument(
                    f"{where} lists {len(inputs)} inputs in ModelMetadata; set input.name and "
                    "input.shape in config.json (exactly one input is supported)"
                )
            name = inputs[0].name
        found = [t for t in inputs if t.name == name]
        if inputs and not found:
            raise InvalidArgument(
                f"{where} has no input {name!r}; its inputs are {[t.name for t in inputs]}"
            )
        if found:
            tensor = found[0]
            if tensor.datatype and tensor.datatype != "FP32":
                raise InvalidArgument(
                    f"{where} input {name!r} is {tensor.datatype}; only FP32 inputs are supported"
                )
            # The first dimension is the batch; the rest is one example.
            remote = list(tensor.shape)[1:]
            if not shape:
                if not remote or any(d <= 0 for d in remote):
                    raise InvalidArgument(
                        f"{where} gives input {name!r} the shape {list(tensor.shape)}, which does "
                        "not fix one example's size; set input.shape in config.json"
                    )
                shape = remote
            elif remote and (
                len(remote) != len(shape)
                or any(r > 0 and r != s for r, s in zip(remote, shape, strict=True))
            ):
                raise InvalidArgument(
                    f"{where} gives input {name!r} the shape {list(tensor.shape)} (batch first); "
                    f"config.json says {shape} per example"
                )
        elif not shape:
            raise InvalidArgument(
                f"{where} gives no input metadata; set input.name and input.shape in config.json"
            )
        outputs = {t.name: t for t in metadata.outputs}
        if outputs and config.output_name not in outputs:
            raise InvalidArgument(
                f"{where} has no output {config.output_name!r}; its outputs are {sorted(outputs)}"
            )
        data = config.model_dump()
        data["input"].update(name=name, shape=shape)
        try:
            return ModelConfig.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(e["msg"] for e in exc.errors())
            raise InvalidArgument(
                f"{where}: with its metadata the config is invalid: {problems}"
            ) from None


def _metadata_dict(metadata: pb.ModelMetadataResponse) -> dict[str, object]:
    tensors = [
        [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in group]
        for group in (metadata.inputs, metadata.outputs)
    ]
    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": tensors[0],
        "outputs": tensors[1],
    }
