"""Process-level services: distributed setup, checkpoints, storage, encryption, metrics, logging, progress."""
