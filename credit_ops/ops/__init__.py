"""The public API, one module per op family (the same stem as in csrc/, triton_kernels/, tests/, benchmarks/).

Nothing is re-exported here, so ``credit_ops.ops.policy_loss`` stays a module: the public functions are
``credit_ops.<name>``.
"""
