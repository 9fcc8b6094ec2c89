"""OpenAI's Files and Batches routes on the replica's FastAPI app.

Uploads stream chunk by chunk from the request body to storage (python-multipart's push
parser), so a file is never whole in memory; the size bound is checked as bytes arrive. Batch
state changes go through the application's runner actor (``batch_runner``), the only writer;
reads come straight from storage. With API keys, each object belongs to the key that made it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import StreamingResponse

from pipeline.endpoint.errors import APIError
from pipeline.formats import BATCH_URLS
from pipeline.serving.batch_objects import (
    Batch, BatchCreate, BatchStatus, FileObject, Page, StoredBatch, StoredFile, checked_id, new_id, now, page,
)
from pipeline.serving.batch_runner import expires_at
from pipeline.serving.batch_store import BatchStore, owner_of

MULTIPART_SLACK = 64 * 1024  # a multipart body's headers and small fields beyond the file itself
PURPOSES = ("batch",)


class Upload:
    """One multipart body, pushed through python-multipart: the ``file`` part is written to a temp
    file in storage as it arrives, the small fields (``purpose``) are kept in memory."""

    def __init__(self, store: BatchStore, path: str, limit: int):
        self.store, self.path, self.limit = store, path, limit
        self.fields: dict[str, bytes] = {}
        self.filename: Optional[str] = None
        self.size = 0
        self.tmp: Optional[str] = None
        self._stream: Any = None
        self._name, self._is_file = "", False
        self._header, self._value, self._headers = b"", b"", {}
        self.pending: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin, "on_part_data": self._data, "on_header_field": self._field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_done,
        }

    def _begin(self) -> None:
        self._headers, self._name, self._is_file = {}, "", False

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _headers_done(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if self.filename is not None:
                raise APIError(400, "send one file per upload", "file")
            self._is_file = True
            self.filename = options[b"filename"].decode("utf-8", "replace")[:512] or "upload.jsonl"
            self.tmp, self._stream = self.store.open_temp(self.path)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.size += end - start
            if self.size > self.limit:
                raise APIError(413, f"file over {self.limit} bytes (the server's --max-file-bytes)", "file")
            self.pending.append(data[start:end])
        else:
            value = self.fields.get(self._name, b"") + data[start:end]
            if len(value) > 1024:
                raise APIError(400, f"form field {self._name[:40]!r} is too long")
            self.fields[self._name] = value

    def flush(self) -> None:
        """Write the file bytes the last body chunk carried (called off the event loop)."""
        if self.pending:
            self._stream.write(b"".join(self.pending))
            self.pending = []

    def close(self, keep: bool) -> None:
        if self._stream is not None:
            self._stream.close()
            if keep:
                self.store.commit(self.tmp, self.path)
            else:
                self.store.discard(self.tmp)


def install(app: FastAPI, server: Any) -> None:
    """Add /v1/files and /v1/batches to ``app``; ``server`` is the replica (store, runner, key)."""
    store: BatchStore = server.batch_store
    limits = server.cfg.batches
    run = asyncio.to_thread

    def owner(request: Request) -> str:
        if not server.bearers:
            return ""
        return owner_of(request.headers.get("authorization", "").removeprefix("Bearer "))

    @app.post("/v1/files")
    async def upload(request: Request) -> FileObject:
        from python_multipart.multipart import MultipartParser, parse_options_header

        kind, options = parse_options_header(request.headers.get("content-type", ""))
        if kind != b"multipart/form-data" or b"boundary" not in options:
            raise APIError(400, "upload a file as multipart/form-data (fields: file, purpose)")
        file_id = new_id("file")
        body = Upload(store, store.file_content(file_id), limits.max_file_bytes)
        parser = MultipartParser(options[b"boundary"], body.callbacks())
        keep = False
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                await run(body.flush)
            parser.finalize()
            purpose = body.fields.get("purpose", b"").decode("utf-8", "replace")
            if body.filename is None:
                raise APIError(400, "no file in the upload (multipart field 'file')", "file")
            if purpose not in PURPOSES:
                raise APIError(400, f"purpose must be one of {', '.join(PURPOSES)}, got {purpose[:40]!r}", "purpose")
            keep = True
        finally:
            await run(body.close, keep)
        stored = StoredFile(id=file_id, bytes=body.size, created_at=now(), filename=body.filename, purpose=purpose,
                            owner=owner(request))
        await run(store.write_json, store.file_meta(file_id), stored)
        return stored.public()

    @app.get("/v1/files")
    async def list_files(request: Request, after: Optional[str] = None, limit: int = Query(10000, ge=1, le=10000),
                         order: str = Query("desc", pattern="^(asc|desc)$"), purpose: Optional[str] = None) -> Page:
        files = await run(store.files, owner(request), purpose)
        return page([f.public() for f in (files if order == "desc" else files[::-1])], after, limit)

    @app.get("/v1/files/{file_id}")
    async def get_file(request: Request, file_id: str) -> FileObject:
        return (await run(store.get_file, file_id, owner(request))).public()

    @app.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> StreamingResponse:
        await run(store.get_file, file_id, owner(request))
        return StreamingResponse(store.read_content(file_id), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> dict:
        await run(store.delete_file, file_id, owner(request))
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches")
    async def create_batch(request: Request, req: BatchCreate) -> Batch:
        endpoints = BATCH_URLS if server.embedder is not None else BATCH_URLS[:1]  # /v1/completions
        if req.endpoint not in endpoints:
            raise APIError(400, f"endpoint {req.endpoint!r} is not served here; use {' or '.join(endpoints)}", "endpoint")
        if req.completion_window not in limits.completion_windows:
            raise APIError(400, f"completion_window must be one of {', '.join(limits.completion_windows)}", "completion_window")
        for key, value in (req.metadata or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise APIError(400, "metadata keys may have 64 characters and values 512", "metadata")
        who = owner(request)
        try:
            source = await run(store.get_file, checked_id(req.input_file_id, "file"), who)
        except APIError:
            raise APIError(400, f"input_file_id {req.input_file_id[:80]!r}: no such file", "input_file_id") from None
        if source.purpose != "batch":
            raise APIError(400, f"input file {source.id} has purpose {source.purpose!r}; upload with purpose 'batch'", "input_file_id")
        created = now()
        batch = StoredBatch(id=new_id("batch"), completion_window=req.completion_window, created_at=created,
                            endpoint=req.endpoint, input_file_id=source.id, expires_at=expires_at(created, req.completion_window),
                            metadata=req.metadata, model=server.name, owner=who)
        await server.call_runner("create", batch.model_dump_json())
        return batch.public()

    @app.get("/v1/batches")
    async def list_batches(request: Request, after: Optional[str] = None, limit: int = Query(20, ge=1, le=100)) -> Page:
        return page([b.public() for b in await run(store.batches, owner(request))], after, limit)

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str) -> Batch:
        return (await run(store.get_batch, batch_id, owner(request))).public()

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Batch:
        batch = await run(store.get_batch, batch_id, owner(request))
        if batch.status in (BatchStatus.completed, BatchStatus.failed, BatchStatus.expired):
            raise APIError(400, f"cannot cancel a batch that is {batch.status}", code="invalid_state")
        return Batch.model_validate_json(await server.call_runner("cancel", batch_id, batch.owner))
