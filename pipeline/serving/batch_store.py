"""Where uploaded files, batch state and batch jobs live: one folder or URI (``--batch-storage``).

Layout (every name is a server-made id, never a client's text)::

    files/<file-id>.json        the File object (and its owner)
    files/<file-id>.jsonl       its content
    batches/<batch-id>.json     the Batch object: the state the runner moves on
    batches/<batch-id>/         the batch's job folder: staged input, content-addressed shards

Every write goes to a temp name first and is renamed into place: a reader (or a restart after
``kill -9``) sees the old state or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any, Optional, TypeVar

import pyarrow.fs as pafs
from pydantic import BaseModel

from pipeline import io
from pipeline.endpoint.errors import APIError
from pipeline.serving.batch_objects import BatchStatus, StoredBatch, StoredFile, checked_id

CHUNK = 1 << 20
READ_ATTEMPTS = 5  # reads of a state file torn by a concurrent rewrite (an object store): tried again
T = TypeVar("T", bound=BaseModel)


def owner_of(api_key: Optional[str]) -> str:
    """Who owns an object: a digest of the key that made it ('' without keys)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else ""


class BatchStore:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = io.filesystem(uri)
        for sub in ("files", "batches"):
            self.fs.create_dir(posixpath.join(self.root, sub), recursive=True)

    # ---- paths (ids checked: only server-made ids get here) ---------------------------------
    def file_meta(self, file_id: str) -> str:
        return posixpath.join(self.root, "files", f"{checked_id(file_id, 'file')}.json")

    def file_content(self, file_id: str) -> str:
        return posixpath.join(self.root, "files", f"{checked_id(file_id, 'file')}.jsonl")

    def batch_state(self, batch_id: str) -> str:
        return posixpath.join(self.root, "batches", f"{checked_id(batch_id, 'batch')}.json")

    def job_folder(self, batch_id: str) -> str:
        return posixpath.join(self.root, "batches", checked_id(batch_id, "batch"))

    def job_uri(self, batch_id: str) -> str:
        """The job folder as a URI ``run_job`` can open (a local path stays a path)."""
        return self._uri("batches", checked_id(batch_id, "batch"))

    def content_uri(self, file_id: str) -> str:
        return self._uri("files", f"{checked_id(file_id, 'file')}.jsonl")

    def _uri(self, *parts: str) -> str:
        """A URI under the storage's: its query (``s3://b/p?endpoint_override=...``) stays last."""
        base, sep, query = self.uri.partition("?") if "://" in self.uri else (self.uri, "", "")
        return "/".join([base.rstrip("/"), *parts]) + sep + query

    # ---- atomic writes ------------------------------------------------------------------------
    def write_json(self, path: str, obj: BaseModel) -> None:
        self.write_bytes(path, obj.model_dump_json(indent=1).encode())

    def write_bytes(self, path: str, data: bytes) -> None:
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, path)

    def open_temp(self, path: str) -> tuple[str, Any]:
        """A temp file beside ``path`` for a streamed write; ``commit`` renames it into place."""
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        return tmp, self.fs.open_output_stream(tmp)

    def commit(self, tmp: str, path: str) -> None:
        self.fs.move(tmp, path)

    def discard(self, tmp: str) -> None:
        try:
            self.fs.delete_file(tmp)
        except (FileNotFoundError, OSError):
            pass

    def read(self, path: str, model: type[T]) -> Optional[T]:
        """``path``'s object, or None if there is none. On S3, pyarrow sizes a read from a HEAD and
        then GETs that range, so a file replaced in between by a longer version reads torn: read again."""
        for attempt in range(READ_ATTEMPTS):
            try:
                with self.fs.open_input_stream(path) as fh:
                    data = fh.read()
            except (FileNotFoundError, OSError):
                return None
            try:
                return model.model_validate(json.loads(data))
            except ValueError:
                if attempt == READ_ATTEMPTS - 1:
                    raise
        return None

    def _list(self, sub: str, model: type[T]) -> list[T]:
        infos = self.fs.get_file_info(pafs.FileSelector(posixpath.join(self.root, sub), allow_not_found=True))
        items = [self.read(i.path, model) for i in infos
                 if i.is_file and i.base_name.endswith(".json") and not i.base_name.startswith(".")]
        return sorted((i for i in items if i is not None), key=lambda o: (o.created_at, o.id), reverse=True)

    # ---- files --------------------------------------------------------------------------------
    def get_file(self, file_id: str, owner: str) -> StoredFile:
        found = self.read(self.file_meta(file_id), StoredFile)
        if found is None or found.owner != owner:
            raise APIError(404, f"no file with id {file_id!r}", code="not_found")
        return found

    def files(self, owner: str, purpose: Optional[str] = None) -> list[StoredFile]:
        return [f for f in self._list("files", StoredFile) if f.owner == owner and (purpose is None or f.purpose == purpose)]

    def delete_file(self, file_id: str, owner: str) -> None:
        self.get_file(file_id, owner)
        self.fs.delete_file(self.file_meta(file_id))  # the object goes first: no half-deleted file is listed
        try:
            self.fs.delete_file(self.file_content(file_id))
        except (FileNotFoundError, OSError):
            pass

    def read_content(self, file_id: str) -> Iterator[bytes]:
        with self.fs.open_input_stream(self.file_content(file_id)) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    def lines(self, file_id: str) -> Iterator[bytes]:
        """The content line by line, streamed (a 200 MB file is never whole in memory)."""
        rest = b""
        for chunk in self.read_content(file_id):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            yield from parts
        if rest:
            yield rest

    # ---- batches ------------------------------------------------------------------------------
    def get_batch(self, batch_id: str, owner: Optional[str] = None) -> StoredBatch:
        found = self.read(self.batch_state(batch_id), StoredBatch)
        if found is None or (owner is not None and found.owner != owner):
            raise APIError(404, f"no batch with id {batch_id!r}", code="not_found")
        return found

    def batches(self, owner: Optional[str] = None) -> list[StoredBatch]:
        return [b for b in self._list("batches", StoredBatch) if owner is None or b.owner == owner]

    def status_counts(self) -> dict[str, int]:
        """How many batches are in each status (every status, zeros included)."""
        counts = {status.value: 0 for status in BatchStatus}
        for batch in self.batches():
            counts[batch.status] = counts.get(batch.status, 0) + 1
        return counts

    def put_batch(self, batch: StoredBatch) -> None:
        self.write_json(self.batch_state(batch.id), batch)
