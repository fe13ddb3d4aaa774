"""Retrieval heads: detection (Wu score, DuoAttention-style gate), ablation, head-level KV compression, NIAH."""
