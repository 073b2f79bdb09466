"""credit_ops.trainer: the thin accelerate-based GRPO / IBPO / Difference Feedback trainer."""
