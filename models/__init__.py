"""LLN decoders as Hugging Face transformers models (issue 3)."""
