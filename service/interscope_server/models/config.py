"""The per-model config file (`config.json` in each model folder of a repository), validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from interscope_server.errors import InvalidArgument
from interscope_server.layout import Layout, channel_axis, check_layout, infer_layout

#: Name of the config file inside each model folder.
CONFIG_FILE = "config.json"

#: Model names are folder names: no separators, no dot-dot, nothing that could escape the repo.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class Normalization(BaseModel):
    """Per-channel (x - mean) / std applied inside the backend, so clients send raw inputs."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float] = Field(description="Per-channel mean, in the raw input range.")
    std: list[float] = Field(description="Per-channel standard deviation; every entry > 0.")

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("normalization mean and std must be non-empty and of equal length")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalization std entries must all be > 0")
        return self


#: Input datatypes a model may take; the engine works in float and casts at the backend edge.
InputDatatype = Literal["FP32", "FP16", "UINT8"]
#: What a model's output means; the backend turns each into canonical scores (see OutputSpec).
OutputKind = Literal["logits", "probabilities", "log_probabilities"]


class TensorSpec(BaseModel):
    """One model input: its name in the model file, per-example shape (no batch dim), dtype.

    Every field may be left out (empty): the backend reads it from the model file, and a value
    that is given must agree with the file.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", description="Input name in the model file; empty: read it.")
    shape: list[int] = Field(
        default_factory=list,
        description="Per-example shape, without the batch dimension; empty: read it.",
    )
    datatype: InputDatatype | None = Field(
        default=None, description="FP32, FP16 or UINT8; None: read it from the model file."
    )
    layout: Layout | None = Field(
        default=None,
        description=(
            "NCHW, NHWC or features. Unset: inferred from the shape where it is unambiguous "
            "(rank 1 features, rank 2 an (H, W) image, rank 3 by its one short end axis); "
            "otherwise the config is refused and asks for it."
        ),
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"input shape must have positive sizes, got {shape}")
        return shape


class OutputSpec(BaseModel):
    """Which model output is the classifier's, and what its numbers are.

    kind: "logits" (any real scores whose softmax is the class probability), "probabilities"
    (rows of p summing to 1; ZipMap maps are read too) or "log_probabilities" (rows of log p).
    None: inferred from the model file where that is safe, else the load is refused naming
    this field.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="", description="Output name (ONNX output, TorchScript tuple index or dict key)."
    )
    kind: OutputKind | None = Field(default=None, description="What the output means.")


class OipEndpoint(BaseModel):
    """Where a format-oip model runs: an Open Inference Protocol v2 gRPC server, and how to call it.

    Secrets stay out of config.json: a bearer token is read from the environment variable named
    by `token_env`, and TLS files are paths (mounted secrets in Kubernetes).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$",
        description="host:port of the remote's gRPC endpoint (no scheme), e.g. triton:8001.",
    )
    model: str = Field(min_length=1, description="The model's name on the remote server.")
    version: str = Field(default="", description="Remote model version; empty: its default.")
    tls: bool = Field(default=False, description="Use TLS (implied by any TLS file).")
    ca_file: str | None = Field(
        default=None, description="PEM roots to trust instead of the system's."
    )
    cert_file: str | None = Field(default=None, description="PEM client certificate (mutual TLS).")
    key_file: str | None = Field(default=None, description="PEM client key (mutual TLS).")
    server_name: str = Field(default="", description="TLS name to verify, if not the url's host.")
    token_env: str = Field(
        default="", description="Environment variable holding a bearer token to send, if any."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra gRPC metadata sent with every call."
    )
    max_batch_size: int = Field(
        default=64, ge=1, le=65536, description="Rows per ModelInfer call: the remote's limit."
    )
    max_concurrency: int = Field(
        default=4, ge=1, le=256, description="ModelInfer calls in flight at once."
    )
    timeout_s: float = Field(default=30.0, gt=0, le=3600, description="Deadline of each call.")
    retries: int = Field(
        default=3, ge=0, le=20, description="Retries of a call that failed with UNAVAILABLE."
    )
    health_interval_s: float = Field(
        default=5.0, gt=0, le=3600, description="How often ModelReady is polled for health."
    )

    @model_validator(mode="after")
    def _check(self) -> OipEndpoint:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("oip cert_file and key_file go together (mutual TLS needs both)")
        if any(k.lower() != k or not k for k in self.headers):
            raise ValueError("oip header names must be non-empty and lower case (gRPC metadata)")
        return self

    @property
    def secure(self) -> bool:
        return self.tls or any(f is not None for f in (self.ca_file, self.cert_file))


class ModelConfig(BaseModel):
    """Everything the service needs to know about one model besides its weights."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name; equals its folder.")
    format: Literal["onnx", "torchscript", "torch_export", "oip"] = Field(
        description="Backend that loads the file (torch_export: a torch.export .pt2); oip "
        "calls a remote server instead."
    )
    file: str = Field(
        default="",
        description="Model file, relative to the model folder; may not leave the folder. "
        "Required except for format oip, which has none.",
    )
    input: TensorSpec = Field(
        default_factory=TensorSpec, description="The input; format oip may leave it out."
    )
    output: OutputSpec = Field(default_factory=OutputSpec)
    classes: list[str] = Field(
        default_factory=list,
        description="Class labels in output order (at least two); empty: read from the model "
        'file (classifier labels) or "0".."K-1".',
    )
    value_range: tuple[float, float] | list[tuple[float, float]] = Field(
        default=(0.0, 1.0),
        description=(
            "Valid raw input range: one [low, high] for every element, or (features layout) "
            "a list of [low, high], one per feature in flattened order; attacks stay inside."
        ),
    )
    feature_names: list[str] | None = Field(
        default=None,
        description="Features layout only: one unique name per feature, in flattened order.",
    )
    normalization: Normalization | None = Field(
        default=None, description="Applied inside the backend; None means inputs go in as sent."
    )
    max_batch_size: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="Largest batch the backend is given at once; a graph with a fixed batch "
        "dimension sets it (a larger value is refused).",
    )
    description: str = Field(default="", description="Free text shown in model metadata.")
    oip: OipEndpoint | None = Field(
        default=None, description="The remote endpoint; required with format oip, else absent."
    )

    @property
    def output_name(self) -> str:
        """The output's name; "logits" where none is set (format oip's old default)."""
        return self.output.name or "logits"

    @model_validator(mode="before")
    @classmethod
    def _legacy_output_name(cls, data: object) -> object:
        # Repositories written before `output` existed say `output_name`; keep reading them.
        if isinstance(data, dict) and "output_name" in data:
            data = dict(data)
            legacy = data.pop("output_name")
            output = dict(data.get("output") or {})
            if output.get("name") not in (None, "", legacy):
                raise ValueError(
                    f"output_name {legacy!r} and output.name {output['name']!r} disagree; "
                    "give only output.name"
                )
            output["name"] = legacy
            data["output"] = output
        return data

    @field_validator("file")
    @classmethod
    def _relative(cls, file: str) -> str:
        if not file:
            return file  # only format oip goes without; _check says so for the others
        if file.startswith(("/", "\\")) or ".." in file.replace("\\", "/").split("/"):
            raise ValueError(f"model file must be a path inside the model folder, got {file!r}")
        return file

    @field_validator("classes")
    @classmethod
    def _two_classes(cls, classes: list[str]) -> list[str]:
        if len(classes) == 1:
            raise ValueError("a classifier needs at least two classes")
        return classes

    @property
    def layout(self) -> Layout:
        """The declared layout, else the one the shape implies (checked at validation)."""
        layout = self.input.layout or infer_layout(self.input.shape)
        if layout is None:  # _check refuses this; a shape filled in later can still be
            raise InvalidArgument(
                f"model {self.name!r}: input shape {self.input.shape} could be channels-first "
                "or channels-last; set input.layout to NCHW or NHWC in its config"
            )
        return layout

    @property
    def n_features(self) -> int:
        """Elements per example (the feature count for a features layout)."""
        count = 1
        for d in self.input.shape:
            count *= d
        return count

    @property
    def per_feature_range(self) -> bool:
        """Whether value_range gives one [low, high] per feature."""
        return isinstance(self.value_range, list)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        self._check_format()
        shape = self.input.shape
        ranges = self.value_range if isinstance(self.value_range, list) else [self.value_range]
        for low, high in ranges:
            if not low < high:
                raise ValueError(f"value_range must have low < high, got [{low}, {high}]")
        if not shape:
            # The shape is read from the model file (or, format oip, from the remote) and the
            # resolved config validated again; a remote's config is not, so it must declare it.
            per_feature = isinstance(self.value_range, list) or self.feature_names is not None
            if per_feature and self.format == "oip":
                raise ValueError("per-feature value_range and feature_names need input.shape")
            return self
        if self.input.layout is None and infer_layout(shape) is None:
            raise ValueError(
                f"input shape {shape} could be channels-first or channels-last; set "
                "input.layout to NCHW or NHWC"
            )
        try:
            check_layout(self.layout, shape)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        if isinstance(self.value_range, list) and (
            self.layout != "features" or len(self.value_range) != self.n_features
        ):
            raise ValueError(
                "a per-feature value_range needs layout features and one [low, high] per "
                f"feature ({self.n_features}); got {len(self.value_range)} for layout "
                f"{self.layout}"
            )
        if self.feature_names is not None:
            if self.layout != "features" or len(self.feature_names) != self.n_features:
                raise ValueError(
                    f"feature_names needs layout features and one name per feature "
                    f"({self.n_features}); got {len(self.feature_names)} for layout {self.layout}"
                )
            if len(set(self.feature_names)) != len(self.feature_names):
                raise ValueError("feature_names must be unique")
        if self.normalization is not None:
            axis = channel_axis(self.layout, len(shape))
            # Features normalise per feature (flattened), images per channel.
            size = (
                self.n_features
                if axis is None and self.layout == "features"
                else (1 if axis is None else shape[axis])
            )
            if len(self.normalization.mean) not in (1, size):
                what = "feature" if self.layout == "features" else "channel"
                raise ValueError(
                    f"normalization needs one entry per {what} ({size} for layout "
                    f"{self.layout}) or a single entry, got {len(self.normalization.mean)}"
                )
        return self

    def _check_format(self) -> None:
        if self.format == "oip":
            if self.oip is None:
                raise ValueError("format oip needs an oip section: the remote url and model")
            if self.file:
                raise ValueError("format oip runs remotely and takes no file")
            if bool(self.input.name) != bool(self.input.shape):
                raise ValueError(
                    "format oip: give both input.name and input.shape, or neither (both then "
                    "come from the remote's ModelMetadata)"
                )
            return
        if self.oip is not None:
            raise ValueError(f"an oip section only goes with format oip, not {self.format}")
        if not self.file:
            raise ValueError(f"format {self.format} needs the model file")
