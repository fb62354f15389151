"""jtkd: transfer learning and knowledge distillation in JAX/Flax from PyTorch/torchvision weights."""

__version__ = "0.1.0"
