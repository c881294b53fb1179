"""Shared test set-up: TensorFlow quiet and Keras 2 selected before anything imports TensorFlow."""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
