"""Secateur service side: storage, the end-to-end pipeline, (later) gRPC."""
