"""Inference engine and OpenAI-compatible server."""
