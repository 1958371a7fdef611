"""Request and response models of the HTTP API (the native ``/infer`` and the KServe V2 protocol)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="stable machine-readable code")
    detail: str = Field(description="what was wrong, for a human")


# ---------------------------------------------------------------------------------------------- /infer
class TaskPrediction(BaseModel):
    label: str | list[str] = Field(description="classes: the most probable label; attributes: the labels with p >= 0.5")
    scores: dict[str, float] = Field(description="classes: softmax probabilities; attributes: sigmoid per label")


class Timings(BaseModel):
    preprocess: float = Field(description="decode + preprocess, ms")
    queue: float = Field(description="wait for the runtime, ms")
    execute: float = Field(description="the runtime's execute, ms")
    total: float = Field(description="from request received to response built, ms")


class InferResponse(BaseModel):
    request_id: str
    model: str
    model_version: str
    combination: str = Field(description="the requested combination, canonical: sorted task names joined by '+'")
    method: str = Field(description="the .pte method that ran: the combination's own, or its cheapest exported "
                                    "superset when the combination was not exported (extra outputs dropped)")
    superset: bool = Field(default=False, description="true when a superset method answered")
    macs: int = Field(description="multiply-accumulates of that method per image")
    batch: int = Field(description="images in this request")
    executed_batch: int = Field(description="rows of the execute that served it (> batch when dynamic batching "
                                            "joined other requests)")
    predictions: list[dict[str, TaskPrediction]] = Field(description="one entry per image: task -> prediction")
    timings_ms: Timings


class MethodInfo(BaseModel):
    combination: str
    tasks: list[str]
    macs: int
    params: int
    loaded: bool


class TaskInfo(BaseModel):
    name: str
    kind: Literal["classes", "attributes"]
    labels: list[str]


class TasksResponse(BaseModel):
    model: str
    model_version: str
    tasks: list[TaskInfo]
    combinations: list[MethodInfo]
    input_shape: list[int]
    max_batch: int


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle_dir: str | None = Field(default=None, description="bundle to switch to; default: the one being served")


class ReloadResponse(BaseModel):
    reloaded: bool
    model: str
    model_version: str
    bundle_dir: str
    detail: str


# ------------------------------------------------------------------------------------------ KServe V2
V2Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                     "FP16", "FP32", "FP64", "BYTES"]


class V2Tensor(BaseModel):
    """An output tensor (JSON ``data``), or an input one; with the binary tensor data extension the values
    follow the JSON header as raw little-endian bytes and ``parameters.binary_data_size`` says how many."""

    name: str
    shape: list[int]
    datatype: V2Datatype
    data: list | None = None  # type: ignore[type-arg]
    parameters: dict[str, object] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    parameters: dict[str, object] = Field(default_factory=dict)
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Ready(BaseModel):
    ready: bool


class V2Live(BaseModel):
    live: bool
