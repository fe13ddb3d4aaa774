"""Super weights (Yu et al. 2024): detection, super-outlier-aware RTN quantization, and QLoRA that keeps them
exact. See docs/quant.md.

- `detect`: one-pass detection + causal confirmation; `python -m pipeline.quant.detect` writes the registry.
- `registry`: the registry JSON (model fingerprint, coordinate checks, published coordinates).
- `rtn`: block-wise RTN with clipping and restore, RESTORE(Q^-1(Q(CLIP(W)))).
- `qlora`: `load_quantized_preserving_super_weights` and `merge_adapter_preserving_super_weights`.
- `plant`: tiny models with a planted super weight trained in place; `python -m pipeline.quant.plant`.
- `evaluate`: fidelity measures (KL, NLL, copy accuracy, super activation).
"""
