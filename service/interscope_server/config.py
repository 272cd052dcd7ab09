"""Server settings: one pydantic-settings class, read from INTERSCOPE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of one interscope replica. Env: INTERSCOPE_<FIELD> (e.g. INTERSCOPE_PORT)."""

    model_config = SettingsConfigDict(env_prefix="INTERSCOPE_", extra="forbid")

    # -- network ---------------------------------------------------------------------------
    host: str = Field(default="0.0.0.0", description="Address the gRPC server binds.")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int | None = Field(
        default=9090,
        ge=0,
        le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free port; unset disables.",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address /metrics binds.")

    # -- models ----------------------------------------------------------------------------
    model_repository: Path | None = Field(
        default=None, description="Directory with one folder per model (config.json + file)."
    )
    load_models: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Comma-separated models to load at start; unset loads every model folder.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where models run: auto uses CUDA when available."
    )
    half_precision: bool = Field(
        default=False, description="Run TorchScript models in FP16 on CUDA."
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="Threads per forward pass (0: the runtime's default)."
    )
    runtime_spinning: bool = Field(
        default=False,
        description="Let the runtimes' thread pools (ONNX Runtime, torch's OpenMP) that run the "
        "models spin-wait between forwards. Off, idle threads sleep. Spinning pays only with the "
        "cores to oneself and one model busy at a time (Square through the server 1.4-1.6x "
        "torchattacks' time against 2.1-2.5x); with a core taken by another process it was 1.4x "
        "slower, with two models attacked at once 5x slower (interscope_server.openmp).",
    )
    max_batch_delay_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="How long the batcher waits to fill a batch while several calls share a "
        "model (a lone call's rows run at once).",
    )
    max_queue_rows: int = Field(
        default=1_000_000,
        ge=1,
        description="Rows waiting per model before new work gets RESOURCE_EXHAUSTED.",
    )
    model_hosts: Literal["process", "inline"] = Field(
        default="process",
        description="process: each model runs in its own supervised host process (isolated); "
        "inline: in the server process (no isolation; for benchmarks and fast tests).",
    )
    model_host_memory_bytes: int = Field(
        default=4096 * MiB,
        ge=0,
        description="Resident memory one model host may use before it is killed; 0: no budget.",
    )
    model_host_grace_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a host may run past its callers' deadline or cancel, or keep an "
        "unload or shutdown waiting, before it is killed.",
    )
    model_host_start_timeout_seconds: float = Field(
        default=120.0, gt=0, description="Longest a model host may take to start and load."
    )
    model_host_probe_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Longest the probe forward of a starting host may take."
    )
    model_host_max_restarts: int = Field(
        default=3,
        ge=0,
        description="Host restarts allowed per minute; one more death marks the model FAILED.",
    )
    max_upload_bytes: int = Field(
        default=256 * MiB, ge=1, description="Largest model file LoadModel accepts as upload."
    )
    allow_uploads: bool = Field(
        default=False,
        description=(
            "Whether LoadModel accepts uploaded model files. Off by default: a model file is "
            "code the server runs, so a replica takes uploads only when its operator says so."
        ),
    )
    model_memory_budget_bytes: int = Field(
        default=2048 * MiB,
        ge=1,
        description=(
            "Most bytes a model's weights and the constants its graph folds at load may take; "
            "checked from the file before any runtime session is built."
        ),
    )

    # -- request limits --------------------------------------------------------------------
    max_players: int = Field(default=4096, ge=2, description="Most players in one profile.")
    max_exact_players: int = Field(
        default=20, ge=2, le=26, description="Most players the exact estimator accepts (2^n)."
    )
    max_forwards_per_request: int = Field(
        default=20_000_000, ge=1, description="Most forward passes one request may plan."
    )
    max_inputs_per_request: int = Field(
        default=4096, ge=1, description="Most inputs in one Profile or Attack request."
    )
    max_tensor_bytes: int = Field(
        default=64 * MiB, ge=1, description="Largest tensor accepted in a request."
    )
    max_message_bytes: int = Field(
        default=128 * MiB, ge=1024, description="Largest gRPC message sent or received."
    )
    max_attack_forwards_per_request: int = Field(
        default=20_000_000,
        ge=1,
        description="Most forward passes (queries) one Attack request or audit sample may plan.",
    )
    max_attack_gradients_per_request: int = Field(
        default=2_000_000,
        ge=1,
        description="Most input-gradient passes (rows x steps) one Attack request may plan.",
    )
    max_concurrent_calls: int = Field(
        default=64, ge=1, description="Analysis calls running at once; more get RESOURCE_EXHAUSTED."
    )
    worker_threads: int = Field(
        default=16, ge=1, description="Threads that run engine and attack work off the event loop."
    )
    reserved_worker_threads: int = Field(
        default=4,
        ge=0,
        description=(
            "Worker threads long calls may never take, so short calls always find them free "
            "(capped at half of worker_threads)."
        ),
    )
    loop_call_forwards: int = Field(
        default=128,
        ge=0,
        description=(
            "A Profile planning at most this many forward passes, on a model in a host "
            "process, is computed on the event loop instead of a worker thread (no thread "
            "hops); a wait on its model longer than 10 ms sends it back to a worker. 0: off."
        ),
    )
    long_call_forwards: int = Field(
        default=100_000,
        ge=0,
        description=(
            "A call (or audit sample) planning more forward plus gradient passes than this is "
            "long: long calls share worker_threads minus reserved_worker_threads, first come "
            "first served."
        ),
    )

    audit_idle_seconds: float = Field(
        default=300.0,
        gt=0,
        description=(
            "An Audit stream that sends nothing (no config, no sample, no half-close) for this "
            "long while it has no sample in work is ended with DEADLINE_EXCEEDED."
        ),
    )
    send_stall_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A call whose client stops reading for this long (its next event cannot be sent) "
            "is cancelled and its slot and buffers freed."
        ),
    )

    # -- security --------------------------------------------------------------------------
    auth_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens; when set every RPC but health needs one.",
    )
    admin_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated bearer tokens for LoadModel uploads and UnloadModel; when "
            "auth_tokens is set those two need one of these (analysis tokens do not suffice)."
        ),
    )
    tls_cert: Path | None = Field(default=None, description="PEM server certificate (TLS).")
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle; when set clients need certificates (mTLS)."
    )

    # -- lifecycle -------------------------------------------------------------------------
    grace_seconds: float = Field(
        default=10.0, ge=0, description="On SIGTERM, how long in-flight calls may finish."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Logging level."
    )

    @field_validator("auth_tokens", "admin_tokens", "load_models", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _tls_pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_tokens and set(self.auth_tokens) & set(self.admin_tokens):
            raise ValueError("admin_tokens must differ from auth_tokens")
        return self
