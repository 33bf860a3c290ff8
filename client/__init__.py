"""Secateur client (grpc and secateur.v1 only): never imports TensorFlow, server or pruner.

from secateur.client import PruningClient
with PruningClient("localhost:50051") as client:
    job = client.prune("gs://models/vgg.keras", "gs://served/vgg", {"ratio": 0.3})
"""

from secateur.client.client import ClientError, PruningClient

__all__ = ["ClientError", "PruningClient"]
