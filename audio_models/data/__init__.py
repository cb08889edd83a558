"""Datasets (what to process) and the loader that decodes it in worker processes."""
