"""The service's response bodies as pydantic models.

Typed outputs give the OpenAPI page (``/docs``) real schemas, and they keep BentoML off a slow
path: for an untyped ``dict`` return it derives the response's media type from a freshly built
JSON schema on every request (~6% of a worker's time under load, measured with py-spy).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TopClass(BaseModel):
    label: str = Field(description="class name, as in the training data")
    index: int = Field(description="class index (the model's output position)")
    probability: float


class ServedModel(BaseModel):
    name: str
    version: str
    alias: str


class Classification(BaseModel):
    """One image: its top-k classes, most likely first."""

    predictions: list[TopClass]
    model: ServedModel | None
    inference_ms: float = Field(description="decoded image to probabilities, batching included")


class BatchClassification(BaseModel):
    """Several images: one top-k list per image, in request order."""

    predictions: list[list[TopClass]]
    model: ServedModel | None
    inference_ms: float


class ExampleImage(BaseModel):
    """A test image of the served version that the web page offers to click."""

    index: int
    label: str = Field(description="its true class")
    url: str = Field(description="where the page fetches the PNG (relative to /ui/)")


class ModelInfo(BaseModel):
    """Which model is served, or why none is."""

    ready: bool
    reason: str | None = None
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    classes: list[str] = Field(default_factory=list)
    input: dict[str, int] = Field(default_factory=dict)
    limits: dict[str, Any] = Field(default_factory=dict)
    mean_batch_size: float | None = None
