"""Secateur client and the `secateur` CLI. Never imports TensorFlow at import time."""
