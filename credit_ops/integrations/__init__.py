"""Adapters that put credit-ops inside RL frameworks, one module per framework (``credit_ops.integrations.verl``,
``credit_ops.integrations.trl``).

Nothing here is imported by ``import credit_ops``: each module imports its framework lazily, so the rest of the
package works without any of them installed.
"""
