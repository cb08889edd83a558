"""Command-line helpers run with ``python -m audio_models.scripts.<name>``."""
