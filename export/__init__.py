"""fedlora.export: turn a trained LoRA adapter into an on-device ONNX model.

The stages are separate modules, imported on demand so that ``import fedlora.export`` stays
light (no torch, transformers, optimum or Flower at import time):

- :mod:`fedlora.export.merge`: ``merge_adapter(base_dir, adapter_dir, out_dir)``, fp32 merge of a
  PEFT LoRA adapter into its base (``merge_and_unload``), saved with the tokenizer.
- :mod:`fedlora.export.onnx`: ``export_onnx(merged_dir, out_dir, graph="auto")``, one
  ``model.onnx`` with a KV cache and the tokenizer files beside it: the fused decoder where the
  model allows it, else optimum's traced export (``text-generation-with-past``).
- :mod:`fedlora.export.fused`: the fused decoder graph of a Llama-family model, written from the
  merged weights (``GroupQueryAttention``, ``SkipSimplifiedLayerNormalization``, packed QKV).
- :mod:`fedlora.export.quantize`: weight-only int8/int4 variants (onnxruntime's
  ``MatMulNBitsQuantizer``; a fused graph's tied embedding quantized once for lookup and head).
- :mod:`fedlora.export.runtime`: ``EdgeModel``, the edge runtime (numpy, onnxruntime, tokenizers,
  jinja2 only): chat template, full-forward logits, greedy generation with the KV cache.
- :mod:`fedlora.export.parity`: ``check_parity(...)``, PyTorch vs ONNX logits and greedy tokens;
  ``ParityError`` when they disagree.
- :mod:`fedlora.export.card`: ``MODEL_CARD.md`` and ``model-card.json`` at the bundle's root:
  base and adapter sha256, the federation, each variant's size, gates and decode speed, licences.
- :mod:`fedlora.export.pipeline`: ``export_adapter(...)``, all of the above with timings.
- :mod:`fedlora.export.slots`, :mod:`fedlora.export.adapter`, :mod:`fedlora.export.adaptable`:
  on-device adapters: a base exported once with a LoRA slot per linear layer, each adapter one
  ``.onnx_adapter`` file the runtime applies per request (``EdgeModel(base, adapter=...)``).
"""
