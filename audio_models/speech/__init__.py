"""Learned speech models (embeddings, transcription, emotion recognition)."""
