"""Evaluation metrics: retrieval, zero-shot classification, multi-label recognition, captioning."""
