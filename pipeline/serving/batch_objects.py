"""OpenAI's File and Batch objects (fields in OpenAI's order, as the official client reads them)
and the server-made ids that name them in storage.

Ids are made here (``file-`` / ``batch_`` + 24 hex digits) and every id a client sends is
checked against ``ID_PATTERN`` before it reaches a path: a client's text never names a file.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from enum import Enum
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from pipeline.endpoint.errors import APIError

ID_PATTERN = re.compile(r"^(file-|batch_)[0-9a-f]{24}$")
MAX_ERRORS = 100  # line-numbered validation errors kept on a failed batch


def new_id(kind: Literal["file", "batch"]) -> str:
    """A server-made id: the creation time in microseconds (13 hex digits), then 11 random ones, so
    ids made within one second still sort in creation order (lists are newest first)."""
    return f"{'file-' if kind == 'file' else 'batch_'}{time.time_ns() // 1000:013x}{uuid.uuid4().hex[:11]}"


def derived_file_id(batch_id: str, role: str) -> str:
    """The output / error file of a batch: the same id whenever finalizing runs (idempotent)."""
    return f"file-{hashlib.sha256(f'{batch_id}/{role}'.encode()).hexdigest()[:24]}"


def checked_id(value: str, kind: Literal["file", "batch"]) -> str:
    """A client-sent id, refused (404) unless it has the shape this server makes."""
    prefix = "file-" if kind == "file" else "batch_"
    if not ID_PATTERN.match(value) or not value.startswith(prefix):
        raise APIError(404, f"no {kind} with id {value[:80]!r}", code="not_found")
    return value


def now() -> int:
    return int(time.time())


class BatchStatus(str, Enum):
    validating = "validating"
    failed = "failed"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    expired = "expired"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BatchStatus.failed, BatchStatus.completed, BatchStatus.expired, BatchStatus.cancelled)


class _Object(BaseModel):
    model_config = ConfigDict(extra="ignore", use_enum_values=True)


class FileObject(_Object):
    id: str
    bytes: int
    created_at: int
    filename: str
    object: Literal["file"] = "file"
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: Optional[int] = None
    status_details: Optional[str] = None


class StoredFile(FileObject):
    """A file as stored: the API object plus its owner (a digest of the API key that made it)."""

    owner: str = ""

    def public(self) -> FileObject:
        return FileObject.model_validate(self.model_dump())


class BatchError(_Object):
    code: Optional[str] = None
    line: Optional[int] = None
    message: Optional[str] = None
    param: Optional[str] = None


class BatchErrors(_Object):
    data: list[BatchError] = Field(default_factory=list)
    object: Literal["list"] = "list"


class RequestCounts(_Object):
    completed: int = 0
    failed: int = 0
    total: int = 0


class Batch(_Object):
    id: str
    completion_window: str
    created_at: int
    endpoint: str
    input_file_id: str
    object: Literal["batch"] = "batch"
    status: BatchStatus = BatchStatus.validating
    cancelled_at: Optional[int] = None
    cancelling_at: Optional[int] = None
    completed_at: Optional[int] = None
    error_file_id: Optional[str] = None
    errors: Optional[BatchErrors] = None
    expired_at: Optional[int] = None
    expires_at: Optional[int] = None
    failed_at: Optional[int] = None
    finalizing_at: Optional[int] = None
    in_progress_at: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    model: Optional[str] = None
    output_file_id: Optional[str] = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)


class StoredBatch(Batch):
    owner: str = ""

    def public(self) -> Batch:
        return Batch.model_validate(self.model_dump())


class BatchCreate(BaseModel):
    """POST /v1/batches."""

    model_config = ConfigDict(extra="ignore")
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: Optional[dict[str, str]] = Field(None, max_length=16)
    output_expires_after: Optional[dict[str, Any]] = None


class Page(BaseModel):
    """OpenAI's cursor page: ``after`` is the last id of the previous page."""

    object: Literal["list"] = "list"
    data: list[Any]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool = False


def page(items: list[Any], after: Optional[str], limit: int) -> Page:
    """Items newest first; the ``limit`` after the item with id ``after``."""
    ids = [i.id for i in items]
    start = ids.index(after) + 1 if after in ids else 0
    chunk = items[start:start + limit]
    return Page(data=chunk, first_id=chunk[0].id if chunk else None, last_id=chunk[-1].id if chunk else None,
                has_more=start + limit < len(items))
