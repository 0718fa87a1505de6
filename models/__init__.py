"""Models: embedders, model-server backends and the RQ-VAE tokenizer. No Prefect, no storage."""
