"""fedlora: federated LoRA fine-tuning on quantized bases, with Flower, exported to ONNX.

The design's rooms are subpackages: ``fedlora.protocol`` (wire format), ``fedlora.client``,
``fedlora.server``, ``fedlora.simulations`` and ``fedlora.export``. Shared pieces (the default
assets, base-model preparation, the default data set, prompting and evaluation) live here.
Nothing heavy is imported at package import time.
"""

from pkgutil import extend_path

# When a Flower App bundle (FAB) of this repository is unpacked and put on sys.path, its
# `fedlora/` folder shadows the installed package; extending the path keeps the installed
# subpackages (fedlora.server, fedlora.client, ...) importable.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
