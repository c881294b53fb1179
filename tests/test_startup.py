"""What a user sees when the package starts: no TensorFlow C++ start-up noise unless asked for."""
from __future__ import annotations

import os
import subprocess
import sys

# The lines TensorFlow 2.21 writes to descriptor 2 while it imports and creates its devices on a
# CPU-only machine (absl logging before InitializeLog: no environment variable turns them off).
NOISE = (
    "cuInit",
    "oneDNN custom operations",
    "cudart_stub",
    "absl::InitializeLog",
    "cpu_feature_guard",
)
QUIET_ENV = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def _stderr(code: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_import_and_first_op_print_no_tensorflow_noise():
    err = _stderr("import tfgalflow\nfrom tfgalflow.model import Flow\nimport tensorflow as tf\n"
                  "print(float(tf.constant(1.0) + 1))", QUIET_ENV)
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)], err


def test_cli_prints_no_tensorflow_noise(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tfgalflow", "mock", "hernquist", "--n", "200", "--seed", "1",
         "--out", str(tmp_path / "m.npz")],
        env=QUIET_ENV, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], (
        done.stderr
    )


def test_users_who_ask_for_tensorflow_logs_still_get_them():
    # TF_CPP_MIN_LOG_LEVEL set before the import means the user wants TensorFlow's own logging:
    # untouched.
    err = _stderr("import tfgalflow\nimport tensorflow as tf\nprint(float(tf.constant(1.0) + 1))",
                  {**QUIET_ENV, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert any(n in err for n in NOISE), err
