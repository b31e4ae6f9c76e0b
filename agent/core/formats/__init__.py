"""Readers for model-package manifests not written by this project (DDA / Lookout for Vision)."""
