"""fedlora: federated LoRA fine-tuning on quantized bases, with Flower, exported to ONNX.

The design's rooms are subpackages: ``fedlora.protocol`` (wire format), ``fedlora.client``,
``fedlora.server``, ``fedlora.simulations`` and ``fedlora.export``. Shared pieces (the default
assets, base-model preparation, the default data set, prompting and evaluation) live here.
Nothing heavy is imported at package import time.
"""

__version__ = "0.1.0"
