"""A TensorFlow-Serving-compatible REST endpoint (aiohttp) over a model directory.

The server answers the TF Serving REST API (https://www.tensorflow.org/tfx/serving/api_rest) for
every SavedModel under a base directory laid out as TF Serving expects,
``BASE/NAME/<integer version>/saved_model.pb`` (all versions are loaded; the highest is the
default)::

    GET  /v1/models/NAME[/versions/N|/labels/L]
         -> {"model_version_status": [...]}
    GET  /v1/models/NAME[/versions/N|/labels/L]/metadata
         -> {"model_spec": ..., "metadata": {"signature_def": ...}}
    POST /v1/models/NAME[/versions/N|/labels/L]:predict
         row      {"instances": [...]} -> {"predictions": [...]}
         columnar {"inputs": ...}      -> {"outputs": ...}

A request's whole batch goes through ONE call of the signature's traced function, in a worker
thread (the event loop only does I/O). Concurrent small requests (<= ``batch_rows`` rows) to a
row-wise signature (listed in the SavedModel's metadata: log_prob, grad_log_prob, serving_default -
never the seeded sample/accelerations) are merged into one call and split again
(:class:`MicroBatcher`). Bodies are parsed and answered as TF Serving does: one output is returned
bare, several as objects keyed by output name; ``NaN``/``Infinity`` tokens are valid JSON here and
non-finite outputs are written as those tokens. orjson, when installed, parses and writes faster
(same values). Errors are ``{"error": "..."}`` with TF Serving's statuses:

    400  malformed JSON or URL, unknown/missing input, wrong shape or dtype, unknown signature name
         (TF Serving: FAILED_PRECONDITION -> 400), unknown version label; and - stricter than TF
         Serving, which passes them to the model - NaN or infinite input values
    404  unknown model or version ("Servable not found for request: Latest(NAME)")
    413  body larger than ``max_body_bytes`` or more than ``max_rows`` rows (a tfgalflow limit)
         or an ``accelerations`` request with more than ``max_positions`` positions
    500  unexpected server failure (the server keeps serving)
    504  the request queued and ran longer than ``request_timeout`` (TF Serving: DEADLINE_EXCEEDED)

The client is :class:`tfgalflow.serving.client.Client` (standard library and NumPy only).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import json
import logging
import os
import re
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .. import validation
from ..errors import FileError, InputError

try:                                    # optional: 4x faster request parsing, 10x faster answers
    import orjson as _orjson
except ImportError:                     # pragma: no cover - the json module does the same, slower
    _orjson = None

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
#: Largest request body accepted (bytes); larger ones get 413.
MAX_BODY_BYTES = 64 * 2**20
#: Largest batch (rows of any input) accepted; larger ones get 413 (bounds the memory of one call).
MAX_ROWS = 100_000
#: Requests of at most this many rows to a row-wise signature are micro-batched (0 = off).
BATCH_ROWS = 256
#: Most positions per ``accelerations`` request (each costs n_velocities draws); more get 413.
MAX_POSITIONS = 1000
#: Seconds a request may queue and run before it is answered 504.
REQUEST_TIMEOUT = 60.0

# TF Serving's URL grammar (http_rest_api_handler.cc, kPathRegex).
_PATH = re.compile(r"/v1/models(?:/(?P<name>[^/:]+))?"
                   r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?P<metadata>/metadata)?(?::(?P<verb>classify|regress|predict))?")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ---- the model repository -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Version:
    version: int
    path: Path
    stamp: float                  # mtime of saved_model.pb when loaded
    model: Any = None             # ExportedModel, or None if loading failed
    error: str = ""


class ModelRepository:
    """All SavedModels under ``base_dir`` (``BASE/NAME/<int>/saved_model.pb``), loaded by version.

    :meth:`scan` loads versions that appeared (or changed) and forgets removed ones; a version that
    fails to load is reported in the model status (state END, with the error) and never served.
    Reads are lock-free: a scan builds a new table and swaps it in.

    Args:
        base_dir: the model base directory.
        version_labels: {model name: {label: version}} for ``/labels/L`` URLs (TF Serving's
            version_labels).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        version_labels: Mapping[str, Mapping[str, int]] | None = None,
    ):
        self.base_dir = Path(base_dir)
        if not self.base_dir.is_dir():
            raise FileError(f"{self.base_dir}: no such model base directory (expected "
                            "BASE/NAME/<version>/saved_model.pb)")
        self.version_labels = {str(m): {str(k): int(v) for k, v in labels.items()}
                               for m, labels in (version_labels or {}).items()}
        self._models: dict[str, dict[int, _Version]] = {}
        self._scan_lock = threading.Lock()

    def scan(self) -> list[str]:
        """Load new or changed versions, drop removed ones; returns one line per change."""
        from ..export import load_saved_model, versions
        changes = []
        with self._scan_lock:
            table: dict[str, dict[int, _Version]] = {}
            for model_dir in sorted(
                p for p in self.base_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            ):
                try:
                    found = versions(model_dir)
                except OSError:               # removed while scanning
                    continue
                for v in found:
                    path = model_dir / str(v)
                    try:
                        stamp = max(
                            (path / f).stat().st_mtime
                            for f in ("saved_model.pb", "saved_model.pbtxt")
                            if (path / f).exists()
                        )
                    except (OSError, ValueError):   # removed while scanning
                        continue
                    old = self._models.get(model_dir.name, {}).get(v)
                    if old is None or old.stamp != stamp:
                        try:
                            entry = _Version(v, path, stamp, model=load_saved_model(path))
                            changes.append(f"loaded {model_dir.name} version {v} ({path})")
                        except FileError as exc:
                            entry = _Version(v, path, stamp, error=str(exc))
                            changes.append(f"failed to load {model_dir.name} version {v}: {exc}")
                            log.error("failed to load %s version %d: %s", model_dir.name, v, exc)
                    else:
                        entry = old
                    table.setdefault(model_dir.name, {})[v] = entry
            for name, found in self._models.items():
                for v in found:
                    if v not in table.get(name, {}):
                        changes.append(f"unloaded {name} version {v} (removed from disk)")
            self._models = table
        return changes

    def models(self) -> dict[str, list[int]]:
        """{name: [available versions]}."""
        return {name: sorted(v for v, e in found.items() if e.model is not None)
                for name, found in self._models.items()}

    def _version_number(self, name: str, version: str | None, label: str | None) -> int | None:
        if label is not None:
            try:
                return self.version_labels[name][label]
            except KeyError:
                raise _HTTPError(400, f"Unrecognized servable version label: {label}") from None
        return int(version) if version is not None else None

    def resolve(
        self, name: str, version: str | None = None, label: str | None = None
    ) -> tuple[int, Any]:
        """(version, ExportedModel) for a request; the highest available one by default."""
        number = self._version_number(name, version, label)
        found = self._models.get(name, {})
        available = {v: e for v, e in found.items() if e.model is not None}
        if number is None:
            if not available:
                raise _HTTPError(404, f"Servable not found for request: Latest({name})")
            number = max(available)
        if number not in available:
            raise _HTTPError(404, f"Servable not found for request: Specific({name}, {number})")
        return number, available[number].model

    def status(self, name: str, version: str | None = None, label: str | None = None) -> dict:
        """GetModelStatusResponse as JSON (TF Serving's model status API)."""
        number = self._version_number(name, version, label)
        found = self._models.get(name, {})
        if not found:
            raise _HTTPError(404, f"Could not find any versions of model {name}")
        if number is not None and number not in found:
            raise _HTTPError(404, f"Could not find version {number} of model {name}")
        entries = [found[number]] if number is not None else [found[v] for v in sorted(found)]
        return {
            "model_version_status": [
                {
                    "version": str(e.version),
                    "state": "AVAILABLE" if e.model is not None else "END",
                    "status": {
                        "error_code": "OK" if e.model is not None else "UNKNOWN",
                        "error_message": e.error,
                    },
                }
                for e in entries
            ]
        }


# ---- request and response bodies (TF Serving's JSON mapping) ------------------------------------

def _parse_body(body: bytes) -> dict:
    if not body:
        raise _HTTPError(400, "JSON Parse error: The document is empty")
    doc = None
    if _orjson is not None:
        try:
            doc = _orjson.loads(body)
        except _orjson.JSONDecodeError:
            # NaN/Infinity tokens, huge integers or malformed: json decides below
            pass
    try:
        if doc is None:
            # accepts NaN / Infinity / -Infinity tokens, as TF Serving does
            doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HTTPError(400, f"JSON Parse error: {exc}") from None
    if not isinstance(doc, dict):
        raise _HTTPError(400, "JSON Value: the request body is not a JSON object")
    return doc


def _row_values(instances: Any, signature: Any) -> dict[str, Any]:
    """Row format: each instance a value (one input) or {input name: value}; stacked on axis 0."""
    if not isinstance(instances, list):
        raise _HTTPError(400, "Expecting 'instances' to be a list/array")
    if not instances:
        raise _HTTPError(400, "No values in 'instances' array")
    names = list(signature.inputs)
    if isinstance(instances[0], dict):
        wanted = set(names)
        for i, instance in enumerate(instances):
            if not isinstance(instance, dict) or set(instance) != wanted:
                got = sorted(instance) if isinstance(instance, dict) else type(instance).__name__
                raise _HTTPError(400, f"Failed to process element: {i} of 'instances' list: got "
                                      f"{got}; every instance must be an object with exactly the "
                                      f"keys {sorted(wanted)} (signature '{signature.name}': "
                                      f"{signature.describe()})")
        return {k: [instance[k] for instance in instances] for k in names}
    if len(names) != 1:
        raise _HTTPError(400, "instances is a plain list, but expecting list of objects as "
                              f"multiple input tensors required (signature '{signature.name}': "
                              f"{signature.describe()})")
    return {names[0]: instances}


def _column_values(inputs: Any, signature: Any) -> dict[str, Any]:
    """Columnar format: a value (single input) or {input name: value}."""
    if isinstance(inputs, dict):
        return inputs
    if len(signature.inputs) != 1:
        raise _HTTPError(400, "inputs is a plain value/list, but expecting an object as multiple "
                              f"input tensors required (signature '{signature.name}': "
                              f"{signature.describe()})")
    return {next(iter(signature.inputs)): inputs}


def _row_outputs(outputs: Mapping[str, np.ndarray], as_lists: bool = True) -> list:
    """'predictions': one output bare (a list per instance), several as one object per instance."""
    batch = {k: (v.shape[0] if v.ndim else None) for k, v in outputs.items()}
    if None in batch.values() or len(set(batch.values())) > 1:
        raise _HTTPError(400, f"outputs have no common batch size {batch}; use the columnar "
                              "format ('inputs')")
    columns = {k: (v.tolist() if as_lists else v) for k, v in outputs.items()}
    if len(columns) == 1:
        return next(iter(columns.values()))
    names = list(columns)
    return [dict(zip(names, row)) for row in zip(*(columns[k] for k in names))]


def _column_outputs(outputs: Mapping[str, np.ndarray], as_lists: bool = True) -> Any:
    """'outputs': one output bare, several as an object keyed by output name."""
    columns = {k: (v.tolist() if as_lists else v) for k, v in outputs.items()}
    return next(iter(columns.values())) if len(columns) == 1 else columns


def _encode_answer(outputs: Mapping[str, np.ndarray], rows: bool) -> bytes:
    """The predict answer as JSON bytes.

    With orjson installed and all outputs finite, arrays are written directly, floats in their
    shortest form that reads back to the same float32 (as TF Serving writes them); otherwise (no
    orjson, or NaN/inf in an output, which must appear as the NaN / Infinity tokens TF Serving
    writes) the json module is used.
    """
    key, layout = ("predictions", _row_outputs) if rows else ("outputs", _column_outputs)
    if _orjson is not None and all(
        np.isfinite(v).all() for v in outputs.values() if v.dtype.kind == "f"
    ):
        try:
            return _orjson.dumps(
                {key: layout(outputs, as_lists=False)}, option=_orjson.OPT_SERIALIZE_NUMPY
            )
        except _orjson.JSONEncodeError:
            pass
    return _json({key: layout(outputs)})


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return False


def _reject_booleans(values: Mapping[str, Any], signature: Any) -> None:
    """JSON true/false among numbers (NumPy reads them as 1/0); TF Serving rejects them too."""
    for name, value in values.items():
        spec = signature.inputs.get(name)
        if spec is not None and spec[1].kind != "b" and _has_bool(value):
            raise _HTTPError(400, f"input '{name}' holds JSON booleans, which are not of the "
                                  f"expected type {spec[1].name} (signature '{signature.name}': "
                                  f"{signature.describe()})")


def _rows_in(values: Mapping[str, Any]) -> int:
    return max((len(v) for v in values.values() if isinstance(v, list)), default=0)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# ---- the aiohttp application --------------------------------------------------------------------

@dataclass(frozen=True)
class _Prepared:
    """A validated request: the signature, its input arrays, the answer's layout (rows or columns),
    and whether the model declares the signature row-wise (then it may be micro-batched).
    """
    signature: Any
    arrays: dict
    rows: bool
    row_wise: bool


class MicroBatcher:
    """Merges concurrent small requests to one row-wise signature into one call (rows joined).

    No timer and no added latency when idle: the first request runs at once; requests that arrive
    while a call runs queue up and go together (up to ``max_rows`` rows) in the next call; each
    gets its own rows of the outputs back. Only signatures whose rows are independent may be
    batched (a SavedModel lists them in its metadata as ``row_wise_signatures``; tfgalflow exports
    list log_prob, grad_log_prob and serving_default, never the seeded
    ``sample``/``accelerations``). If a merged call fails on the data, each request is run alone so
    only the faulty one gets the error.
    """

    def __init__(self, signature: Any, executor: concurrent.futures.Executor, max_rows: int):
        self.signature, self.executor, self.max_rows = signature, executor, max_rows
        self.pending: list[tuple[dict, asyncio.Future]] = []
        self.draining = False
        self._task: asyncio.Task | None = None
        self.calls = 0

    async def run(self, arrays: dict) -> dict[str, np.ndarray]:
        """The signature's outputs for this request's rows, computed in a merged call."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((arrays, future))
        if not self.draining:
            self.draining = True
            self._task = asyncio.get_running_loop().create_task(self._drain())   # keep a reference
        return await future

    @staticmethod
    def _rows(arrays: dict) -> int:
        return next(iter(arrays.values())).shape[0]

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                batch = [self.pending.pop(0)]
                rows = self._rows(batch[0][0])
                while self.pending and rows + self._rows(self.pending[0][0]) <= self.max_rows:
                    batch.append(self.pending.pop(0))
                    rows += self._rows(batch[-1][0])
                try:
                    results = await loop.run_in_executor(
                        self.executor, self._call, [a for a, _ in batch]
                    )
                except Exception as exc:   # noqa: BLE001 - handed to every waiting request
                    results = [exc] * len(batch)
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self.draining = False

    def _call(self, requests: list[dict]) -> list:
        """Worker thread: ONE signature call on the concatenated rows, split back per request."""
        self.calls += 1
        if len(requests) == 1:
            return [self.signature.run(requests[0])]
        merged = {k: np.concatenate([r[k] for r in requests]) for k in requests[0]}
        try:
            outputs = self.signature.run(merged)
        except InputError:
            results = []
            for r in requests:
                try:
                    results.append(self.signature.run(r))
                except InputError as exc:
                    results.append(exc)
            return results
        cuts = np.cumsum([self._rows(r) for r in requests])[:-1]
        parts = {k: np.split(v, cuts) for k, v in outputs.items()}
        return [{k: parts[k][i] for k in outputs} for i in range(len(requests))]


class _Endpoint:
    """The request handler: routing, limits, and the two thread pools that run signature calls.

    Parsing and validation run in the ``light`` pool. A signature the SavedModel declares row-wise
    (``row_wise_signatures``: log_prob, grad_log_prob, serving_default) is called in the ``light``
    pool too, micro-batched when small; every other signature (the seeded ``sample`` and
    ``accelerations``, and all signatures of models without that declaration) is called in the
    ``heavy`` pool. A row-wise request therefore never queues behind expensive calls (head-of-line
    blocking): at most ``heavy_workers`` expensive calls run at once, and the light pool keeps its
    own threads for cheap ones.
    """

    def __init__(self, repository: ModelRepository, *, max_body_bytes: int, max_rows: int,
                 workers: int, heavy_workers: int, batch_rows: int, max_positions: int,
                 request_timeout: float):
        self.repository = repository
        self.max_body_bytes, self.max_rows, self.batch_rows = max_body_bytes, max_rows, batch_rows
        self.max_positions, self.request_timeout = max_positions, request_timeout
        self.batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.light = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="tfgalflow-serving")
        self.heavy = concurrent.futures.ThreadPoolExecutor(
            max_workers=heavy_workers, thread_name_prefix="tfgalflow-serving-heavy")

    @staticmethod
    def _respond(status: int, payload: bytes):
        from aiohttp import web
        return web.Response(body=payload, status=status, content_type="application/json")

    def _error(self, status: int, message: str):
        return self._respond(status, _json({"error": message}))

    async def handle(self, request):
        from aiohttp import web
        path, method = request.path, request.method
        match = _PATH.fullmatch(path)
        if match is None:
            if path.startswith("/v1/"):
                return self._error(400, f"Malformed request: {method} {path}")
            return self._error(404, f"Not found: {method} {path}")
        name, version, label = match["name"], match["version"], match["label"]
        metadata, verb = match["metadata"] is not None, match["verb"]
        if name is None:
            return self._error(400, "Missing model name in request." if method == "GET"
                               else f"Malformed request: {method} {path}")
        try:
            if method == "GET" and verb is None and not metadata:
                return self._respond(200, _json(self.repository.status(name, version, label)))
            if method == "GET" and metadata and verb is None:
                return self._respond(200, _json(self._metadata(name, version, label)))
            if method == "POST" and verb is not None and not metadata:
                length = request.content_length
                if length is not None and length > self.max_body_bytes:
                    return self._too_large(length)
                try:
                    body = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    return self._too_large(None)
                try:
                    result = await asyncio.wait_for(
                        self._predict(name, version, label, verb, body), self.request_timeout)
                except asyncio.TimeoutError:
                    return self._error(504, "the request took longer than "
                                            f"{self.request_timeout:g} s (request_timeout) to "
                                            "queue and run; retry later or send fewer rows per "
                                            "request")
                return self._respond(*result)
            return self._error(400, f"Malformed request: {method} {path}")
        except _HTTPError as exc:
            return self._error(exc.status, exc.message)

    def _too_large(self, size: int | None):
        what = f"{size} bytes" if size is not None else "the request body"
        return self._error(413, f"{what} exceeds the limit of {self.max_body_bytes} bytes per "
                                f"request (max_body_bytes); split the batch into smaller requests")

    def _metadata(self, name: str, version: str | None, label: str | None) -> dict:
        number, model = self.repository.resolve(name, version, label)
        return {"model_spec": {"name": name, "signature_name": "", "version": str(number)},
                "metadata": {"signature_def": {"signature_def": model.signature_defs}}}

    async def _predict(self, name: str, version: str | None, label: str | None, verb: str,
                       body: bytes) -> tuple[int, bytes]:
        """Parse and validate (light pool), then call: micro-batched, light pool or heavy pool."""
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(self.light, self._prepare, name, version, label, verb,
                                             body)
        if not isinstance(request, _Prepared):
            return request
        rows = {a.shape[0] if a.ndim else -1 for a in request.arrays.values()}
        if (request.row_wise and self.batch_rows and len(rows) == 1
                and 0 < next(iter(rows)) <= self.batch_rows):
            return await self._run_batched(request)
        pool = self.light if request.row_wise else self.heavy
        return await loop.run_in_executor(pool, self._call, request)

    def _prepare(self, name: str, version: str | None, label: str | None, verb: str,
                 body: bytes) -> tuple[int, bytes] | _Prepared:
        """Worker thread: parse and validate -> a :class:`_Prepared` call, or (status, body)."""
        try:
            doc = _parse_body(body)
            signature_name = doc.get("signature_name", "serving_default")
            if not isinstance(signature_name, str):
                raise _HTTPError(400, "'signature_name' key must be a string value.")
            _, model = self.repository.resolve(name, version, label)
            if verb != "predict":
                raise _HTTPError(400, f"{verb} is not supported for these models (their "
                                      "signatures use the predict method); use :predict")
            signature = model.signatures.get(signature_name or "serving_default")
            if signature is None or signature.name.startswith("__"):
                raise _HTTPError(400, f'Serving signature key "{signature_name}" not found.')
            if "instances" in doc and "inputs" in doc:
                raise _HTTPError(400, "Not formatted correctly: expecting only one of 'inputs' or "
                                      "'instances'")
            if "instances" in doc:
                rows, values = True, _row_values(doc["instances"], signature)
            elif "inputs" in doc:
                rows, values = False, _column_values(doc["inputs"], signature)
            else:
                raise _HTTPError(400, "Missing 'inputs' or 'instances' key")
            if _rows_in(values) > self.max_rows:
                raise _HTTPError(413, f"{_rows_in(values)} rows exceed the limit of "
                                      f"{self.max_rows} rows per request (max_rows); split the "
                                      "batch into smaller requests")
            if b"true" in body or b"false" in body:
                _reject_booleans(values, signature)
            arrays = signature.check(values)
            positions = arrays.get("positions")
            if (signature.name == "accelerations" and positions is not None
                    and positions.shape[0] > self.max_positions):
                raise _HTTPError(413, f"{positions.shape[0]} positions exceed the limit of "
                                      f"{self.max_positions} positions per accelerations request "
                                      f"(max_positions); split them into smaller requests")
            row_wise = signature.name in model.metadata.get("row_wise_signatures", ())
            return _Prepared(signature, arrays, rows, row_wise)
        except _HTTPError as exc:
            return exc.status, _json({"error": exc.message})
        except InputError as exc:
            return 400, _json({"error": str(exc)})
        except Exception as exc:   # noqa: BLE001 - a bug must not take the server down
            log.exception("predict on %s failed", name)
            return 500, _json({"error": f"internal error: {type(exc).__name__}: {exc}"})

    @staticmethod
    def _call(request: _Prepared) -> tuple[int, bytes]:
        """Worker thread: ONE signature call on the whole batch, formatted. Never raises."""
        try:
            return 200, _encode_answer(request.signature.run(request.arrays), request.rows)
        except _HTTPError as exc:
            return exc.status, _json({"error": exc.message})
        except InputError as exc:
            return 400, _json({"error": str(exc)})
        except Exception as exc:   # noqa: BLE001 - a bug must not take the server down
            log.exception("predict on %s failed", request.signature.name)
            return 500, _json({"error": f"internal error: {type(exc).__name__}: {exc}"})

    async def _run_batched(self, request: _Prepared) -> tuple[int, bytes]:
        batcher = self.batchers.get(request.signature)
        if batcher is None:
            batcher = self.batchers[request.signature] = MicroBatcher(
                request.signature, self.light, self.batch_rows)
        try:
            return 200, _encode_answer(await batcher.run(request.arrays), request.rows)
        except _HTTPError as exc:
            return exc.status, _json({"error": exc.message})
        except InputError as exc:
            return 400, _json({"error": str(exc)})
        except Exception as exc:   # noqa: BLE001 - a bug must not take the server down
            log.exception("batched predict on %s failed", request.signature.name)
            return 500, _json({"error": f"internal error: {type(exc).__name__}: {exc}"})

    async def close(self, app=None) -> None:
        self.light.shutdown(wait=False, cancel_futures=True)
        self.heavy.shutdown(wait=False, cancel_futures=True)


def _settle_heap(changes: list[str]) -> None:
    """Log the repository changes; after (un)loading models, gc.freeze() every live object.

    With TensorFlow and the models loaded the heap holds ~10^6 long-lived objects, and each full
    collection triggered while a request body is parsed (10^4 lists for 10^4 rows) walks them all:
    freezing them (gc.freeze) makes parsing a 10^4-point body ~3x faster. Objects of unloaded
    versions are released by a collection just before re-freezing.
    """
    for line in changes:
        log.info("%s", line)
    if changes:
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def make_app(base_dir: str | os.PathLike, *, max_body_bytes: int = MAX_BODY_BYTES,
             max_rows: int = MAX_ROWS, workers: int | None = None,
             heavy_workers: int | None = None, poll_seconds: float | None = None,
             version_labels: Mapping[str, Mapping[str, int]] | None = None,
             batch_rows: int = BATCH_ROWS, max_positions: int = MAX_POSITIONS,
             request_timeout: float = REQUEST_TIMEOUT):
    """The aiohttp ``web.Application`` serving every model under ``base_dir`` (loaded on return).

    Args:
        base_dir: ``BASE`` of ``BASE/NAME/<version>/saved_model.pb``.
        max_body_bytes: largest request body in bytes (413 beyond it).
        max_rows: most rows of any input per request (413 beyond); bounds one call's memory.
        workers: threads parsing requests and calling row-wise signatures (log_prob,
            grad_log_prob, serving_default); default min(4, CPUs).
        heavy_workers: threads calling every other signature (sample, accelerations, signatures
            of foreign models), so that those never hold up row-wise requests; default
            max(1, workers // 2).
        poll_seconds: rescan ``base_dir`` for new/removed versions this often (None = never).
        version_labels: {model: {label: version}} for ``/labels/L`` URLs.
        batch_rows: requests of at most this many rows to a row-wise signature are micro-batched
            with concurrent ones (calls of up to this many rows); 0 turns batching off.
        max_positions: most positions per ``accelerations`` request (413 beyond).
        request_timeout: seconds a request may queue and run before it is answered 504 (a call
            already running finishes in its thread; its answer is dropped).
    """
    from aiohttp import web
    max_body_bytes = validation.integer(max_body_bytes, "max_body_bytes")
    max_rows = validation.integer(max_rows, "max_rows")
    batch_rows = validation.integer(batch_rows, "batch_rows", low=0)
    max_positions = validation.integer(max_positions, "max_positions")
    request_timeout = validation.positive_number(request_timeout, "request_timeout")
    workers = min(4, os.cpu_count() or 1) if workers is None else validation.integer(workers,
                                                                                     "workers")
    heavy_workers = (max(1, workers // 2) if heavy_workers is None
                     else validation.integer(heavy_workers, "heavy_workers"))
    repository = ModelRepository(base_dir, version_labels)
    _settle_heap(repository.scan())
    endpoint = _Endpoint(repository, max_body_bytes=max_body_bytes, max_rows=max_rows,
                         workers=workers, heavy_workers=heavy_workers, batch_rows=batch_rows,
                         max_positions=max_positions, request_timeout=request_timeout)
    app = web.Application(client_max_size=max_body_bytes)
    app[_repository_key()] = repository
    app.router.add_route("*", "/{tail:.*}", endpoint.handle)

    async def poll(app):
        async def rescan():
            loop = asyncio.get_running_loop()
            while True:
                await asyncio.sleep(poll_seconds)
                try:
                    _settle_heap(await loop.run_in_executor(endpoint.light, repository.scan))
                except Exception:   # noqa: BLE001 - keep polling (and serving) whatever the disk does
                    log.exception("rescanning %s failed", repository.base_dir)
        task = asyncio.create_task(rescan()) if poll_seconds else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(poll)
    app.on_cleanup.append(endpoint.close)
    return app


@functools.cache
def _repository_key():
    from aiohttp import web
    return web.AppKey("repository", ModelRepository)


def _describe(repository: ModelRepository) -> str:
    models = repository.models()
    return ", ".join(f"{n} (versions "
                     f"{', '.join(map(str, v))})" for n, v in models.items()) or "no models"


def listening_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A TCP socket bound to (host, port), checked before any model is loaded (port 0: any free).

    Raises InputError in one line when the port is not in [0, 65535], the host is unknown, or the
    address cannot be bound (typically: another server already listens there).
    """
    port = validation.integer(port, "port", low=0, high=65535)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot listen on host {host!r}, port {port}: {reason}; choose a free "
                         f"port (or stop the server already using it)") from None
    return sock


def serve(base_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          **options: Any) -> None:
    """Serve every model under ``base_dir`` at http://host:port until interrupted (Ctrl-C).

    Listens on the loopback interface by default; pass host="0.0.0.0" to expose it. The address is
    bound first, so a busy or invalid port fails at once (InputError), before models are loaded.
    ``options`` go to :func:`make_app` (max_body_bytes, max_rows, workers, heavy_workers,
    poll_seconds, version_labels, batch_rows, max_positions, request_timeout).
    """
    from aiohttp import web
    sock = listening_socket(host, port)
    try:
        app = make_app(base_dir, **options)
        print(f"tfgalflow serve: {_describe(app[_repository_key()])} at "
              f"{_url(sock)}/v1/models/NAME (Ctrl-C to stop)", flush=True)
        web.run_app(app, sock=sock, access_log=None, print=None)
    finally:
        sock.close()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Running:
    """A server started by :func:`running`: its base URL and model repository."""
    url: str
    repository: ModelRepository


@contextlib.contextmanager
def running(base_dir: str | os.PathLike, host: str = DEFAULT_HOST, port: int = 0,
            **options: Any) -> Iterator[Running]:
    """Run the endpoint in a background thread for a ``with`` block (port 0 = any free port).

    Example::

        with running("saved_models") as server:
            Client(server.url, model="hernquist_iso").predict(x)
    """
    from aiohttp import web
    sock = listening_socket(host, port)
    try:
        app = make_app(base_dir, **options)
    except BaseException:
        sock.close()
        raise
    loop = asyncio.new_event_loop()
    started, failure = threading.Event(), []
    stop = asyncio.Event()

    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.SockSite(runner, sock).start()
        except Exception as exc:   # noqa: BLE001 - reported to the caller below
            failure.append(exc)
            started.set()
            await runner.cleanup()
            return
        started.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),),
                              name="tfgalflow-server", daemon=True)
    thread.start()
    started.wait()
    try:
        if failure:
            raise failure[0]
        yield Running(_url(sock), app[_repository_key()])
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()
        sock.close()
