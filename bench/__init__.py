"""jtkd benchmarks: JAX (jtkd) vs PyTorch on the same machine, in one run.

    python -m bench [--size tiny|small|full] [--device cpu|gpu]   # writes bench/RESULTS.md, results.json

Modules: run (CLI, orchestration), train_step, distill, pipeline, conversion, mfu, report, common.
"""
