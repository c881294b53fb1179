"""The TF-Serving-compatible REST endpoint and its client, on SavedModels with analytic answers.

The served models are plain ``tf.Module``s written here, so every answer is checked against a
formula:

* ``normal`` (versions 1 and 2, sigma = version): isotropic normal in 3D,
  log p(x) = -|x|^2 / (2 sigma^2) - 3 log sigma - (3/2) log 2 pi,  grad log p = -x / sigma^2;
  signatures ``serving_default`` (log_prob), ``two_outputs`` (log_prob + grad_log_prob),
  ``scaled`` (inputs x [N,3] float32 and k [N] int64 -> y = k x), ``count_calls`` (returns how
  often the signature ran - one call per request, whatever the batch size).
* ``half_plus_three`` (version 123): y = x / 2 + 3, TF Serving's own documentation model, so the
  request bodies of the REST documentation are sent verbatim and must give its documented answers.
* ``broken`` (version 1): a corrupt saved_model.pb; reported in its status, never served.

Float tolerances: outputs are float32 computed from float32 inputs; relative 2e-6 (about 16 ulp)
covers the few rounding steps, while a wrong sign, factor or version (sigma 1 vs 2) is off by O(1).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgalflow.errors import InputError
from tfgalflow.serving import Client, ServingError, running

RTOL = 2e-6
X_SPEC = tf.TensorSpec([None, 3], tf.float32, name="x")


class NormalModule(tf.Module):
    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = tf.Variable(sigma, dtype=tf.float32)
        self.calls = tf.Variable(0, dtype=tf.int64)
        # Declares which signatures are row-wise, so the server may micro-batch them
        # (as export() does).
        self.tfgalflow_metadata = tf.Variable(
            json.dumps({"row_wise_signatures": ["serving_default", "two_outputs"]}),
            dtype=tf.string,
            trainable=False,
        )

    def _log_prob(self, x):
        return (-0.5 * tf.reduce_sum(x * x, axis=1) / self.sigma**2 - 3.0 * tf.math.log(self.sigma)
                - 1.5 * math.log(2 * math.pi))

    @tf.function(input_signature=[X_SPEC])
    def log_prob(self, x):
        return {"log_prob": self._log_prob(x)}

    @tf.function(input_signature=[X_SPEC])
    def two_outputs(self, x):
        return {"log_prob": self._log_prob(x), "grad_log_prob": -x / self.sigma**2}

    @tf.function(input_signature=[X_SPEC, tf.TensorSpec([None], tf.int64, name="k")])
    def scaled(self, x, k):
        return {"y": x * tf.cast(k, tf.float32)[:, None]}

    @tf.function(input_signature=[X_SPEC])
    def count_calls(self, x):
        n = self.calls.assign_add(1)
        return {"calls": tf.fill(tf.shape(x)[:1], n)}


class HalfPlusThree(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def predict(self, x):
        return {"y": 0.5 * x + 3.0}


def save_normal(path: Path, sigma: float) -> None:
    m = NormalModule(sigma)
    tf.saved_model.save(m, str(path), signatures={
        "serving_default": m.log_prob, "two_outputs": m.two_outputs, "scaled": m.scaled,
        "count_calls": m.count_calls})


def normal_log_prob(x, sigma: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (
        -0.5 * (x * x).sum(axis=1) / sigma**2 - 3 * math.log(sigma) - 1.5 * math.log(2 * math.pi)
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("models")
    for v in (1, 2):
        save_normal(base / "normal" / str(v), sigma=float(v))
    m = HalfPlusThree()
    tf.saved_model.save(
        m, str(base / "half_plus_three" / "123"), signatures={"serving_default": m.predict}
    )
    (base / "broken" / "1").mkdir(parents=True)
    (base / "broken" / "1" / "saved_model.pb").write_bytes(b"this is not a protocol buffer")
    return base


@pytest.fixture(scope="module")
def server(base):
    with running(base, max_body_bytes=100_000, max_rows=1000,
                 version_labels={"normal": {"stable": 1, "canary": 2}}) as srv:
        yield srv


def call(url: str, body: bytes | str | None = None, method: str | None = None) -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(
        url, data=data, method=method or ("GET" if data is None else "POST")
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.headers["Content-Type"].startswith("application/json")
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- status and metadata ------------------------------------------------------------------------

def test_status_lists_every_version_like_tf_serving(server):
    ok = {"error_code": "OK", "error_message": ""}
    assert call(server.url + "/v1/models/normal") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": ok},
        {"version": "2", "state": "AVAILABLE", "status": ok}]})
    assert call(server.url + "/v1/models/normal/versions/2")[1]["model_version_status"] == [
        {"version": "2", "state": "AVAILABLE", "status": ok}]
    assert (
        call(server.url + "/v1/models/normal/labels/stable")[1]["model_version_status"][0][
            "version"
        ]
        == "1"
    )
    # The documented answer of TF Serving's example (curl http://localhost:8501/v1/models/half_plus_three).
    assert call(server.url + "/v1/models/half_plus_three") == (200, {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": ok}]})
    status, broken = call(server.url + "/v1/models/broken")
    assert status == 200 and broken["model_version_status"][0]["state"] == "END"
    assert "saved_model.pb" in broken["model_version_status"][0]["status"]["error_message"]
    assert call(server.url + "/v1/models/nope")[0] == 404
    assert call(server.url + "/v1/models/normal/versions/7") == (
        404, {"error": "Could not find version 7 of model normal"})


def test_metadata_lists_signatures_as_tf_serving(server):
    status, meta = call(server.url + "/v1/models/normal/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "normal", "signature_name": "", "version": "2"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "two_outputs", "scaled", "count_calls"} <= set(defs)
    x = defs["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert x["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}, {"size": "3", "name": ""}],
                                 "unknown_rank": False}
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert set(defs["two_outputs"]["outputs"]) == {"log_prob", "grad_log_prob"}
    assert defs["scaled"]["inputs"]["k"]["dtype"] == "DT_INT64"
    assert (
        call(server.url + "/v1/models/normal/versions/1/metadata")[1]["model_spec"]["version"]
        == "1"
    )


# ---- predict: the documentation's bodies and both formats ---------------------------------------

def test_rest_documentation_examples_verbatim(server):
    # tensorflow.org/tfx/serving/api_rest, "Example": the half_plus_three predict call and
    # its answer.
    assert call(
        server.url + "/v1/models/half_plus_three:predict", '{"instances": [1.0,2.0,5.0]}'
    ) == (200, {"predictions": [3.5, 4.0, 5.5]})
    # ... and the documented error for a model name that is not served.
    assert call(server.url + "/v1/models/half:predict", '{"instances": [1.0,5.0]}') == (
        404, {"error": "Servable not found for request: Latest(half)"})
    # TF Serving's handler tests: explicit signature_name, and the columnar form
    # answering "outputs".
    assert call(server.url + "/v1/models/half_plus_three/versions/123:predict",
                '{"signature_name": "serving_default", "instances": [3.0, 4.0]}') == (
        200, {"predictions": [4.5, 5.0]})
    assert call(
        server.url + "/v1/models/half_plus_three/versions/123:predict",
        '{"signature_name": "serving_default", "inputs": [3.0, 4.0]}',
    ) == (200, {"outputs": [4.5, 5.0]})


def test_row_and_columnar_formats_give_the_formula(server):
    x = [[0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 1.0, -2.5]]
    expected = normal_log_prob(x, sigma=2.0)             # latest version: sigma = 2
    url = server.url + "/v1/models/normal:predict"
    status, rows = call(url, json.dumps({"instances": x}))
    assert status == 200 and set(rows) == {"predictions"}
    np.testing.assert_allclose(rows["predictions"], expected, rtol=RTOL)
    status, cols = call(url, json.dumps({"inputs": x}))
    assert status == 200 and set(cols) == {"outputs"}
    np.testing.assert_allclose(cols["outputs"], expected, rtol=RTOL)
    status, named = call(url, json.dumps({"inputs": {"x": x}}))      # one output: still bare
    np.testing.assert_allclose(named["outputs"], expected, rtol=RTOL)
    status, objects = call(url, json.dumps({"instances": [{"x": row} for row in x]}))
    np.testing.assert_allclose(objects["predictions"], expected, rtol=RTOL)


def test_several_outputs_are_objects_keyed_by_name(server):
    x = np.array([[1.0, 2.0, -1.0], [0.25, 0.0, 4.0]])
    url = server.url + "/v1/models/normal:predict"
    status, rows = call(
        url, json.dumps({"signature_name": "two_outputs", "instances": x.tolist()})
    )
    assert status == 200 and len(rows["predictions"]) == 2
    for row, xi, lp in zip(rows["predictions"], x, normal_log_prob(x, 2.0)):
        assert set(row) == {"log_prob", "grad_log_prob"}
        np.testing.assert_allclose(row["log_prob"], lp, rtol=RTOL)
        np.testing.assert_allclose(row["grad_log_prob"], -xi / 4.0, rtol=RTOL)
    status, cols = call(url, json.dumps({"signature_name": "two_outputs", "inputs": x.tolist()}))
    assert set(cols["outputs"]) == {"log_prob", "grad_log_prob"}
    np.testing.assert_allclose(cols["outputs"]["grad_log_prob"], -x / 4.0, rtol=RTOL)


def test_several_inputs_and_integer_dtype(server):
    url = server.url + "/v1/models/normal:predict"
    body = {
        "signature_name": "scaled",
        "instances": [{"x": [1.0, 2.0, 3.0], "k": 2}, {"x": [0.5, 0.5, 0.5], "k": -3}],
    }
    assert call(url, json.dumps(body)) == (
        200,
        {"predictions": [[2.0, 4.0, 6.0], [-1.5, -1.5, -1.5]]},
    )
    body = {"signature_name": "scaled", "inputs": {"x": [[1.0, 2.0, 3.0]], "k": [5]}}
    assert call(url, json.dumps(body)) == (200, {"outputs": [[5.0, 10.0, 15.0]]})


def test_versions_and_labels_route_to_their_model(server):
    x = [[1.0, 1.0, 1.0]]
    for route, sigma in (("/versions/1", 1.0), ("/versions/2", 2.0), ("/labels/stable", 1.0),
                         ("/labels/canary", 2.0), ("", 2.0)):
        status, answer = call(
            f"{server.url}/v1/models/normal{route}:predict", json.dumps({"instances": x})
        )
        assert status == 200, route
        np.testing.assert_allclose(
            answer["predictions"], normal_log_prob(x, sigma), rtol=RTOL, err_msg=route
        )


def test_one_signature_call_per_request(server):
    # count_calls returns the call counter: a 500-row request must raise it by exactly one.
    url = server.url + "/v1/models/normal/versions/1:predict"
    _, first = call(
        url,
        json.dumps({"signature_name": "count_calls", "instances": np.zeros((500, 3)).tolist()}),
    )
    _, second = call(
        url, json.dumps({"signature_name": "count_calls", "inputs": np.zeros((7, 3)).tolist()})
    )
    assert len(set(first["predictions"])) == 1 and len(first["predictions"]) == 500
    assert second["outputs"] == [first["predictions"][0] + 1] * 7


def test_non_finite_outputs_are_written_as_tf_serving_tokens(server):
    # |x|^2 = 1e40 overflows float32, so log p = -inf; TF Serving writes it as the token -Infinity.
    status, raw = 0, b""
    request = urllib.request.Request(server.url + "/v1/models/normal:predict", method="POST",
                                     data=b'{"instances": [[1e20, 0, 0], [0, 0, 0]]}')
    with urllib.request.urlopen(request, timeout=30) as response:
        status, raw = response.status, response.read()
    assert status == 200 and b"-Infinity" in raw
    answer = json.loads(raw)["predictions"]
    assert answer[0] == -math.inf
    np.testing.assert_allclose(answer[1], normal_log_prob([[0, 0, 0]], 2.0)[0], rtol=RTOL)


def test_answers_are_the_same_with_the_json_module_alone(server, monkeypatch):
    # orjson (optional) only speeds up parsing and writing: the values must not change without it.
    import tfgalflow.serving.server as server_module
    x = np.random.default_rng(5).normal(size=(20, 3)).astype(np.float32)
    bodies = [{"instances": x.tolist()}, {"inputs": x.tolist()},
              {"signature_name": "two_outputs", "instances": x.tolist()},
              {"signature_name": "two_outputs", "inputs": {"x": x.tolist()}}]
    url = server.url + "/v1/models/normal:predict"
    fast = [call(url, json.dumps(b)) for b in bodies]
    monkeypatch.setattr(server_module, "_orjson", None)
    plain = [call(url, json.dumps(b)) for b in bodies]
    def float32(answer):          # the same nesting, numbers as the float32 values they denote
        if isinstance(answer, dict):
            return {k: float32(v) for k, v in answer.items()}
        if isinstance(answer, list) and answer and isinstance(answer[0], dict):
            return [float32(v) for v in answer]
        return np.asarray(answer, np.float32).tolist()

    for (s1, a1), (s2, a2) in zip(fast, plain):
        assert s1 == s2 == 200
        assert float32(a1) == float32(a2)


# ---- errors: TF Serving's statuses, and the server keeps serving --------------------------------

ERRORS = [
    # (route, body, status, part of the message)
    (":predict", "", 400, "The document is empty"),
    (":predict", "instances = [1, 2]", 400, "JSON Parse error"),
    (":predict", "[1, 2, 3]", 400, "not a JSON object"),
    (
        ":predict",
        '{"signature_name": 100, "instances": [[1, 2, 3]]}',
        400,
        "'signature_name' key must be a string",
    ),
    (
        ":predict",
        '{"signature_name": "nope", "instances": [[1, 2, 3]]}',
        400,
        'Serving signature key "nope" not found.',
    ),
    (":predict", '{"values": [[1, 2, 3]]}', 400, "Missing 'inputs' or 'instances' key"),
    (
        ":predict",
        '{"instances": [[1, 2, 3]], "inputs": [[1, 2, 3]]}',
        400,
        "only one of 'inputs' or 'instances'",
    ),
    (":predict", '{"instances": []}', 400, "No values in 'instances' array"),
    (":predict", '{"instances": [{"y": [1, 2, 3]}]}', 400, "exactly the keys ['x']"),
    (":predict", '{"inputs": {"x": [[1, 2, 3]], "y": [1]}}', 400, "no input named 'y'"),
    (
        ":predict",
        '{"signature_name": "scaled", "inputs": {"x": [[1, 2, 3]]}}',
        400,
        "missing input 'k'",
    ),
    (
        ":predict",
        '{"signature_name": "scaled", "instances": [[1, 2, 3]]}',
        400,
        "expecting list of objects",
    ),
    (
        ":predict",
        '{"instances": [[1, 2]]}',
        400,
        "input 'x' has shape [1, 2]; expected [N, 3] float32",
    ),
    (":predict", '{"inputs": [1, 2, 3]}', 400, "input 'x' has shape [3]; expected [N, 3]"),
    (":predict", '{"instances": [[1, 2, 3], [4, 5]]}', 400, "not a rectangular array"),
    (
        ":predict",
        '{"instances": [[1, 2, "a"]]}',
        400,
        "strings, which are not of the expected type float32",
    ),
    (":predict", '{"instances": [[1, 2, true]]}', 400, "booleans"),
    (
        ":predict",
        '{"signature_name": "scaled", "inputs": {"x": [[1, 2, 3]], "k": [1.5]}}',
        400,
        "not of the expected type int64",
    ),
    (":predict", '{"instances": [[1, 2, NaN]]}', 400, "NaN or infinite"),
    (":predict", '{"inputs": {"x": [[1, -Infinity, 3]]}}', 400, "NaN or infinite"),
    (":predict", '{"instances": [[1, 2, 1e39]]}', 400, "beyond the float32 range"),
    (":predict", json.dumps({"instances": [[0, 0, 0]] * 1001}), 413, "limit of 1000 rows"),
    (
        ":predict",
        json.dumps({"instances": [[0.123456789] * 3] * 5000}),
        413,
        "limit of 100000 bytes",
    ),
    (":classify", '{"examples": [{"x": 1.0}]}', 400, "use :predict"),
    (
        "/versions/9:predict",
        '{"instances": [[1, 2, 3]]}',
        404,
        "Servable not found for request: Specific(normal, 9)",
    ),
    (
        "/labels/nope:predict",
        '{"instances": [[1, 2, 3]]}',
        400,
        "Unrecognized servable version label: nope",
    ),
    ("/versions/x:predict", '{"instances": [[1, 2, 3]]}', 400, "Malformed request"),
]


@pytest.mark.parametrize(
    "route, body, status, message", ERRORS, ids=[f"{e[2]}-{e[3][:30]}" for e in ERRORS]
)
def test_bad_requests_get_tf_serving_errors_and_the_server_keeps_serving(
    server, route, body, status, message
):
    got_status, answer = call(f"{server.url}/v1/models/normal{route}", body)
    assert got_status == status
    assert set(answer) == {"error"} and message in answer["error"], answer
    ok_status, ok = call(
        server.url + "/v1/models/normal:predict", '{"instances": [[1.0, 1.0, 1.0]]}'
    )
    assert ok_status == 200
    np.testing.assert_allclose(ok["predictions"], normal_log_prob([[1, 1, 1]], 2.0), rtol=RTOL)


def test_routing_errors(server):
    assert call(server.url + "/v1/models/broken:predict", '{"instances": [[1, 2, 3]]}') == (
        404, {"error": "Servable not found for request: Latest(broken)"})
    assert call(server.url + "/v1/models/normal:predict")[0] == 400               # GET on :predict
    # POST on metadata
    assert call(server.url + "/v1/models/normal/metadata", "{}")[0] == 400
    assert call(server.url + "/v1/foo")[0] == 400
    assert call(server.url + "/v1/models")[1] == {"error": "Missing model name in request."}
    assert call(server.url + "/index.html")[0] == 404


# ---- the client ---------------------------------------------------------------------------------

def test_client_round_trips_both_formats(server):
    x = np.array([[0.1, -0.2, 0.3], [1.5, 2.5, -3.5]], np.float32)
    client = Client(server.url, model="normal")
    assert client.status()["model_version_status"][-1]["version"] == "2"
    assert set(client.metadata()["metadata"]["signature_def"]["signature_def"]) >= {
        "serving_default"
    }
    for fmt in ("rows", "columns"):
        lp = client.predict(x, format=fmt)
        assert lp.dtype == np.float32 and lp.shape == (2,)
        np.testing.assert_allclose(lp, normal_log_prob(x, 2.0), rtol=RTOL)
        both = client.predict({"x": x}, signature_name="two_outputs", format=fmt)
        np.testing.assert_allclose(both["grad_log_prob"], -x / 4.0, rtol=RTOL)
        y = client.predict({"x": x, "k": np.array([3, -1])}, signature_name="scaled", format=fmt)
        np.testing.assert_allclose(y, x * np.array([[3.0], [-1.0]]), rtol=RTOL)
    v1 = Client(server.url, model="normal", version=1).predict(x)
    np.testing.assert_allclose(v1, normal_log_prob(x, 1.0), rtol=RTOL)
    np.testing.assert_allclose(
        Client(server.url, model="normal", label="stable").predict(x), v1, rtol=0
    )


def test_client_errors_carry_status_and_message(server):
    with pytest.raises(ServingError) as info:
        Client(server.url, model="nope").predict(np.zeros((1, 3)))
    assert (
        info.value.status == 404
        and info.value.message == "Servable not found for request: Latest(nope)"
    )
    with pytest.raises(ServingError) as info:
        Client(server.url, model="normal").predict(np.array([[np.nan, 0.0, 0.0]]))
    assert info.value.status == 400 and "NaN" in info.value.message
    with socket.socket() as s:                      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ServingError) as info:
        Client(dead, model="normal", timeout=5).status()
    assert info.value.status is None and "cannot reach" in info.value.message


def test_concurrent_requests_all_answer_correctly(server):
    rng = np.random.default_rng(3)
    batches = [
        rng.normal(size=(int(n), 3)).astype(np.float32) for n in rng.integers(1, 300, size=24)
    ]
    results: dict[int, np.ndarray] = {}

    def work(i):
        results[i] = Client(server.url, model="normal").predict(
            batches[i], format=("rows", "columns")[i % 2]
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == len(batches)
    for i, x in enumerate(batches):
        np.testing.assert_allclose(results[i], normal_log_prob(x, 2.0), rtol=RTOL)


class SlowDouble:
    """A stand-in row-wise signature y = 2x; its first call blocks until released; x < 0 fails."""
    name = "double"

    def __init__(self):
        self.started, self.release, self.rows = threading.Event(), threading.Event(), []

    def run(self, arrays):
        self.rows.append(len(arrays["x"]))
        if len(self.rows) == 1:
            self.started.set()
            self.release.wait(30)
        if (arrays["x"] < 0).any():
            raise InputError("negative x")
        return {"y": 2 * arrays["x"]}


def test_micro_batcher_merges_requests_that_queue_during_a_call():
    from concurrent.futures import ThreadPoolExecutor
    from tfgalflow.serving import MicroBatcher
    signature = SlowDouble()
    inputs = [
        np.array([1.0]),
        np.array([10.0]),
        np.array([20.0, 21.0]),
        np.array([-5.0]),
        np.array([30.0, 31.0, 32.0]),
    ]

    async def scenario():
        with ThreadPoolExecutor(2) as executor:
            batcher = MicroBatcher(signature, executor, max_rows=5)
            first = asyncio.ensure_future(batcher.run({"x": inputs[0]}))
            while not signature.started.is_set():              # the first call is running ...
                await asyncio.sleep(0.005)
            rest = [asyncio.ensure_future(batcher.run({"x": x})) for x in inputs[1:]]
            while len(batcher.pending) < 4:                    # ... while the others queue up
                await asyncio.sleep(0.005)
            signature.release.set()
            return [await first] + list(await asyncio.gather(*rest, return_exceptions=True))

    results = asyncio.run(scenario())
    # Call 1: the first request alone. Call 2: the next three (1 + 2 + 1 = 4 rows <= 5)
    # merged; it fails on x = -5, so they are re-run one by one (1, 2, 1 rows).
    # Call 3: the 3-row request (4 + 3 > 5).
    assert signature.rows == [1, 4, 1, 2, 1, 3]
    for x, result in zip(inputs, results):
        if (x < 0).any():
            assert isinstance(result, InputError)
        else:
            np.testing.assert_array_equal(result["y"], 2 * x)


# ---- new versions while serving, and the CLI ----------------------------------------------------

def test_rescan_serves_new_versions_and_forgets_removed_ones(tmp_path):
    save_normal(tmp_path / "normal" / "1", sigma=1.0)
    x = [[1.0, 0.0, 2.0]]
    with running(tmp_path) as srv:
        client = Client(srv.url, model="normal")
        np.testing.assert_allclose(client.predict(x), normal_log_prob(x, 1.0), rtol=RTOL)
        save_normal(tmp_path / "normal" / "3", sigma=3.0)
        assert srv.repository.scan() == [f"loaded normal version 3 ({tmp_path / 'normal' / '3'})"]
        np.testing.assert_allclose(client.predict(x), normal_log_prob(x, 3.0), rtol=RTOL)
        (tmp_path / "normal" / "3").rename(tmp_path / "normal" / ".old-3")
        assert srv.repository.scan() == ["unloaded normal version 3 (removed from disk)"]
        np.testing.assert_allclose(client.predict(x), normal_log_prob(x, 1.0), rtol=RTOL)


def test_polling_picks_up_an_exported_version(tmp_path):
    save_normal(tmp_path / "normal" / "1", sigma=1.0)
    x = [[0.0, 1.0, 0.0]]
    with running(tmp_path, poll_seconds=0.1) as srv:
        client = Client(srv.url, model="normal")
        # written aside, then renamed in, as export() does
        save_normal(tmp_path / ".tmp-2", sigma=2.0)
        (tmp_path / ".tmp-2").rename(tmp_path / "normal" / "2")
        deadline = time.monotonic() + 60
        while [s["version"] for s in client.status()["model_version_status"]] != ["1", "2"]:
            assert time.monotonic() < deadline, "version 2 was never loaded"
            time.sleep(0.1)
        np.testing.assert_allclose(client.predict(x), normal_log_prob(x, 2.0), rtol=RTOL)


def test_cli_serve_answers_on_loopback(base):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "tfgalflow.cli",
        "serve",
        str(base),
        "--port",
        str(port),
        "--poll-seconds",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        client = Client(f"http://127.0.0.1:{port}", model="half_plus_three")
        deadline = time.monotonic() + 90
        while True:
            try:
                answer = client.predict([1.0, 2.0, 5.0])
                break
            except ServingError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stdout.read() if proc.poll() else ""
                )
                time.sleep(0.3)
        np.testing.assert_array_equal(answer, np.array([3.5, 4.0, 5.5], np.float32))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "half_plus_three (versions 123)" in out and f"http://127.0.0.1:{port}" in out


def test_cli_serve_on_a_busy_or_invalid_port_fails_in_one_line_before_loading(base, capsys,
                                                                              monkeypatch):
    # Issue #11.4: the port is checked (bound) first, so the error comes at once, as one line
    # with exit status 2 - not a traceback after the models have loaded.
    from tfgalflow import cli
    from tfgalflow.serving import ModelRepository

    def no_loading(self):
        raise AssertionError("models were loaded before the port was checked")

    monkeypatch.setattr(ModelRepository, "scan", no_loading)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for arg, reason in ((str(port), "in use"), ("-1", "[0, 65535]"), ("65536", "[0, 65535]")):
            assert cli.main(["serve", str(base), "--port", arg]) == 2, arg
            err = capsys.readouterr().err
            assert err.startswith("tfgalflow serve: error:") and err.count("\n") == 1, err
            assert "port" in err and reason in err, err


# ---- expensive signatures: separate pool, limits, timeout (issue #11.8) -------------------------

N_VELOCITIES = 512          # velocity draws per position: a 600-position call takes seconds


@pytest.fixture(scope="module")
def halo(tmp_path_factory) -> Path:
    """BASE/halo/1: a real tfgalflow export of a 6D flow, with the accelerations signature."""
    from tfgalflow.export import export_model
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow
    w = np.random.default_rng(0).normal(size=(2000, 6)) * [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    base = tmp_path_factory.mktemp("halo")
    flow = Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), seed=0)).adapt(w)
    export_model(flow, base / "halo" / "1", n_velocities=N_VELOCITIES)
    return base


def _positions(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)


def test_cheap_requests_do_not_queue_behind_accelerations(halo):
    from tfgalflow.export import load_saved_model
    x = np.array([[0.3, -0.2, 0.1, 0.2, 0.0, -0.1]], np.float32)
    done: dict[str, float] = {}
    answers: dict[str, object] = {}

    def accelerations(key):
        client = Client(url, model="halo", timeout=120)
        answers[key] = client.predict({"positions": _positions(600), "seed": np.full(600, 1)},
                                      "accelerations", format="columns")
        done[key] = time.monotonic()

    # Two workers, as on a 2-CPU host: two expensive requests used to occupy both, and a 1-row
    # log_prob then waited for one of them to finish.
    with running(halo, workers=2) as server:
        url = server.url
        client = Client(url, model="halo")
        client.predict(x, "log_prob")                                   # warm-up (tracing)
        threads = [threading.Thread(target=accelerations, args=(k,)) for k in ("a", "b")]
        for t in threads:
            t.start()
        time.sleep(0.5)                                 # both expensive requests are being served
        log_prob = client.predict(x, "log_prob")
        done["log_prob"] = time.monotonic()
        for t in threads:
            t.join(120)
    assert set(done) == {"a", "b", "log_prob"}, "a request did not finish"
    # The cheap request answers while the expensive ones still run (order, not a wall-clock time).
    assert done["log_prob"] < min(done["a"], done["b"]), done
    # ... and answers correctly: the in-process SavedModel, float32 precision (rtol 1e-5).
    np.testing.assert_allclose(log_prob, load_saved_model(halo / "halo" / "1").log_prob(x),
                               rtol=1e-5, atol=1e-5)
    for key in ("a", "b"):
        assert answers[key]["acceleration"].shape == (600, 3)


def test_accelerations_position_cap_and_request_timeout(halo):
    with running(halo, max_positions=200, request_timeout=0.2) as server:
        body = json.dumps({"signature_name": "accelerations",
                           "inputs": {"positions": _positions(201).tolist(), "seed": [1] * 201}})
        status, answer = call(server.url + "/v1/models/halo:predict", body)
        assert status == 413
        assert "201 positions exceed the limit of 200 positions per accelerations request" in \
            answer["error"]
        # 200 positions x 512 velocities (plus tracing on the first call) take far longer than
        # 0.2 s: the client gets 504 instead of waiting, and the server keeps answering.
        body = json.dumps({"signature_name": "accelerations",
                           "inputs": {"positions": _positions(200).tolist(), "seed": [1] * 200}})
        status, answer = call(server.url + "/v1/models/halo:predict", body)
        assert status == 504 and "request_timeout" in answer["error"], answer
        assert Client(server.url, model="halo").status()["model_version_status"][0]["state"] == \
            "AVAILABLE"
