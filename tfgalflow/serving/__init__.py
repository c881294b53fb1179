"""Serving: a TF-Serving-compatible REST endpoint (:mod:`.server`) and its client (:mod:`.client`).

``from tfgalflow.serving import Client, running, serve`` - the names below are the package's API;
the client imports neither aiohttp nor TensorFlow.
"""
from __future__ import annotations

from .client import DEFAULT_URL, Client, ServingError
from .server import (BATCH_ROWS, DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_POSITIONS,
                     MAX_ROWS, REQUEST_TIMEOUT, MicroBatcher, ModelRepository, Running,
                     listening_socket, make_app, running, serve)

__all__ = ["Client", "ServingError", "ModelRepository", "MicroBatcher", "Running", "make_app",
           "running", "serve", "listening_socket", "DEFAULT_HOST", "DEFAULT_PORT", "DEFAULT_URL",
           "MAX_BODY_BYTES", "MAX_ROWS", "BATCH_ROWS", "MAX_POSITIONS", "REQUEST_TIMEOUT"]
