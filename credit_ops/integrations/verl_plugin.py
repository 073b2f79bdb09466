"""verl's plugin entry point for credit-ops (``[verl.plugins] credit_ops = credit_ops.integrations.verl_plugin``).

``import verl`` imports this module in every process; importing it registers the credit-ops policy losses and
trainer modes (credit_ops.integrations.verl.register). verl logs plugin errors at debug level only, so a failure
is also reported here as a warning.
"""

import logging

try:
    from credit_ops.integrations.verl import register

    register()
except Exception as e:  # pragma: no cover - reported, never raised into verl's import
    logging.getLogger(__name__).warning("credit_ops: registering with verl failed: %s", e)
