"""Client of a TF-Serving-compatible REST endpoint: standard library (urllib, json) and NumPy only.

:class:`Client` talks to :mod:`tfgalflow.serving.server` and to a real ``tensorflow_model_server``
alike (https://www.tensorflow.org/tfx/serving/api_rest); errors raise :class:`ServingError` with
the server's message and HTTP status.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, TfgalflowError
from .server import DEFAULT_HOST, DEFAULT_PORT

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"


class ServingError(TfgalflowError):
    """An error answer of a TF-Serving-compatible endpoint (``status`` None: unreachable)."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None):
        self.message, self.status, self.url = message, status, url
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}" if status is not None else message)


_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_HALF": np.float16,
           "DT_INT64": np.int64, "DT_INT32": np.int32, "DT_INT16": np.int16, "DT_INT8": np.int8,
           "DT_UINT64": np.uint64, "DT_UINT32": np.uint32, "DT_UINT8": np.uint8,
           "DT_BOOL": np.bool_}


class Client:
    """Client of a TF-Serving-compatible REST endpoint (standard library: urllib + json; NumPy).

    Example::

        client = Client("http://127.0.0.1:8501", model="hernquist_iso")
        client.status()                                         # {"model_version_status": [...]}
        client.predict(x)                                       # log_prob [N] (serving_default)
        client.predict({"seed": np.full(1000, 7)}, signature_name="sample")   # [1000, 6]

    Args:
        url: base URL of the server.
        model: model name.
        version: a version number, or None for the server's default (highest).
        label: a version label instead of a number.
        timeout: seconds per request.

    Errors raise :class:`ServingError` with the server's message and HTTP ``status``.
    """

    def __init__(self, url: str = DEFAULT_URL, model: str = "", version: int | None = None,
                 label: str | None = None, timeout: float = 60.0):
        if not model:
            raise InputError("Client(url, model=NAME): the model name is required")
        if version is not None and label is not None:
            raise InputError("Client: give a version or a label, not both")
        self.url, self.model, self.version = url.rstrip("/"), model, version
        self.label, self.timeout = label, timeout
        self._dtypes: dict[str, dict[str, Any]] | None = None

    @property
    def model_url(self) -> str:
        """``URL/v1/models/NAME``, with ``/versions/N`` or ``/labels/L`` when one was chosen."""
        path = f"{self.url}/v1/models/{urllib.parse.quote(self.model, safe='')}"
        if self.version is not None:
            path += f"/versions/{int(self.version)}"
        elif self.label is not None:
            path += f"/labels/{urllib.parse.quote(self.label, safe='')}"
        return path

    def _request(self, url: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text
            raise ServingError(message, exc.code, url) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServingError(f"cannot reach {url}: {reason}", None, url) from None

    def status(self) -> dict:
        """The model status (``model_version_status``)."""
        return self._request(self.model_url)

    def metadata(self) -> dict:
        """The model metadata (``model_spec`` and ``metadata.signature_def``)."""
        return self._request(self.model_url + "/metadata")

    def _output_dtypes(self, signature_name: str) -> dict[str, Any]:
        if self._dtypes is None:
            try:
                defs = self.metadata()["metadata"]["signature_def"]["signature_def"]
                self._dtypes = {s: {k: _DTYPES.get(o.get("dtype"))
                                    for k, o in d.get("outputs", {}).items()}
                                for s, d in defs.items()}
            except (ServingError, KeyError, TypeError, AttributeError):
                self._dtypes = {}
        return self._dtypes.get(signature_name, {})

    def predict(self, inputs: Mapping[str, Any] | Any, signature_name: str = "serving_default",
                format: str = "rows") -> dict[str, np.ndarray] | np.ndarray:
        """Call ``:predict``: ``inputs`` is {input name: array [N, ...]} or one array (one input).

        ``format`` "rows" sends ``{"instances": [...]}``, "columns" sends ``{"inputs": ...}``.
        Returns an array when the signature has one output, else {output name: array}; dtypes
        follow the model's metadata (float32 for DT_FLOAT) when the endpoint serves it.
        """
        if format not in ("rows", "columns"):
            raise InputError(f"format = {format!r}: expected 'rows' or 'columns'")
        named = isinstance(inputs, Mapping)
        arrays = {k: np.asarray(v) for k, v in inputs.items()} if named else np.asarray(inputs)
        if format == "columns":
            body = {"inputs": ({k: a.tolist() for k, a in arrays.items()} if named
                               else arrays.tolist())}
        elif named:
            lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
            if None in lengths.values() or len(set(lengths.values())) != 1:
                raise InputError(f"row format needs every input to have the same number of rows, "
                                 f"got {lengths}; use format='columns'")
            names = list(arrays)
            rows = zip(*(arrays[k].tolist() for k in names))
            body = {"instances": [dict(zip(names, row)) for row in rows]}
        else:
            body = {"instances": arrays.tolist()}
        body["signature_name"] = signature_name
        answer = self._request(self.model_url + ":predict", body)
        dtypes = self._output_dtypes(signature_name)
        if "predictions" in answer:
            values = answer["predictions"]
            if values and isinstance(values[0], dict):
                return {k: self._array([row[k] for row in values], dtypes.get(k))
                        for k in values[0]}
        elif "outputs" in answer:
            values = answer["outputs"]
            if isinstance(values, dict):
                return {k: self._array(v, dtypes.get(k)) for k, v in values.items()}
        else:
            raise ServingError(f"unexpected answer without 'predictions' or 'outputs': "
                               f"{str(answer)[:200]}", 200, self.model_url)
        single = next(iter(dtypes.values())) if len(dtypes) == 1 else None
        return self._array(values, single)

    @staticmethod
    def _array(values: Any, dtype: Any) -> np.ndarray:
        return np.asarray(values, dtype=dtype) if dtype is not None else np.asarray(values)
