"""FedAvg with 2-bit quantized updates and a Hadamard rotation, MNIST CNN.

mnist_cnn_fedavg.py's task; every client uploads its update quantized to 2
bits per coordinate (unbiased stochastic rounding between the vector's min
and max) after a randomized Hadamard rotation (Suresh et al. 2017): ~9x fewer
bits than float32 (``bits_uploaded`` per client per round is recorded).
``--config.compression.method=top_k --config.compression.fraction=0.01``
sends the top 1% of coordinates with error feedback instead.
"""

from configs import common
from configs import mnist_cnn_fedavg


def get_config(mode: str = ""):
  config = mnist_cnn_fedavg.get_config()
  config.compression.update({"method": "quantize", "num_bits": 2,
                             "rotation": "hadamard"})
  return common.apply_mode(config, mode)
