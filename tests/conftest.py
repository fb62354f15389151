import os

# Before jax is imported anywhere: 4 fake CPU devices for the data-parallel tests, quiet TensorFlow.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import torch  # noqa: E402,F401  torch before tensorflow (see README: triton segfault)
