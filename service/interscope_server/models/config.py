"""The per-model config file (`config.json` in each model folder of a repository), validated."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class TensorSpec(BaseModel):
    """One model input: its name in the model file, per-example shape (no batch dim), dtype."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Input name inside the model file (ONNX graph input).")
    shape: list[int] = Field(description="Per-example shape, without the batch dimension.")
    datatype: Literal["FP32"] = Field(
        default="FP32", description="Open Inference Protocol datatype; only FP32 for now."
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"input shape must be non-empty with positive sizes, got {shape}")
        return shape


class ModelConfig(BaseModel):
    """Everything the service needs to know about one model besides its weights."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name; equals its folder.")
    format: Literal["onnx", "torchscript"] = Field(description="Backend that loads the file.")
    file: str = Field(
        description="Model file, relative to the model folder; may not leave the folder."
    )
    input: TensorSpec
    output_name: str = Field(default="logits", description="Name of the logits output.")
    classes: list[str] = Field(description="Class labels, in logit order; at least two.")
    value_range: tuple[float, float] = Field(
        default=(0.0, 1.0), description="Valid raw input range [low, high]; attacks stay inside."
    )
    normalization: Normalization | None = Field(
        default=None, description="Applied inside the backend; None means inputs go in as sent."
    )
    max_batch_size: int = Field(
        default=256, ge=1, le=65536, description="Largest batch the backend is given at once."
    )
    description: str = Field(default="", description="Free text shown in model metadata.")

    @field_validator("file")
    @classmethod
    def _relative(cls, file: str) -> str:
        if not file or file.startswith(("/", "\\")) or ".." in file.replace("\\", "/").split("/"):
            raise ValueError(f"model file must be a path inside the model folder, got {file!r}")
        return file

    @field_validator("classes")
    @classmethod
    def _two_classes(cls, classes: list[str]) -> list[str]:
        if len(classes) < 2:
            raise ValueError("a classifier needs at least two classes")
        return classes

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        low, high = self.value_range
        if not low < high:
            raise ValueError(f"value_range must have low < high, got {self.value_range}")
        if self.normalization is not None and len(self.normalization.mean) not in (
            1,
            self.input.shape[0],
        ):
            raise ValueError(
                "normalization needs one entry per channel (the first input dimension, "
                f"{self.input.shape[0]}) or a single entry, got {len(self.normalization.mean)}"
            )
        return self
