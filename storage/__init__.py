"""Artifact storage: one fsspec store (local or s3://), a content-addressed stage cache, manifests."""
