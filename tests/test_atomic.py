"""Atomic writes leave the old file or the new one, never a partial one; JSON-ready copies."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from tfgalflow.atomic import atomic_dir, atomic_file, json_ready, write_json


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_json_ready_round_trips_numpy_values():
    value = {1: np.float32(0.5), "x": np.arange(3), "t": (np.int64(2), np.bool_(True)),
             "nested": {"nan": np.nan, "inf": -np.inf, "s": "text"}}
    strict = json_ready(value)
    # strict JSON: NaN and ±inf become null, so allow_nan=False must not raise
    text = json.dumps(strict, allow_nan=False)
    assert json.loads(text) == {"1": 0.5, "x": [0, 1, 2], "t": [2, True],
                                "nested": {"nan": None, "inf": None, "s": "text"}}
    assert type(strict["t"][1]) is bool and type(strict["x"][0]) is int
    kept = json_ready(value, nonfinite_as_null=False)["nested"]
    assert math.isnan(kept["nan"]) and kept["inf"] == -math.inf


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_outputs_get_the_permissions_of_plain_ones(tmp_path, umask):
    # the independent truth is the kernel's own: a file made by open() and a directory made by
    # mkdir() under the same umask (mkstemp/mkdtemp alone would give 0600/0700 whatever the umask,
    # leaving a SavedModel unreadable to a serving process running as another user)
    old = os.umask(umask)
    try:
        write_json(tmp_path / "report.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("w")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert mode["report.json"] == mode["plain.json"] == 0o666 & ~umask
    assert mode["model"] == mode["plain_dir"] == 0o777 & ~umask
    # rewriting an existing file keeps its mode, as open(path, "w") on it does
    for name, writer in (("plain.json", lambda q: q.write_text("[]")),
                         ("report.json", lambda q: write_json(q, {"a": 2}))):
        os.chmod(tmp_path / name, 0o640)
        writer(tmp_path / name)
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640
