"""credit-ops: fused kernels for process-level credit assignment in GRPO-style reinforcement learning.

Importing the package registers the ``torch.ops.credit.*`` custom ops (C++ CPU kernels, CUDA kernels when
built with CUDA, Triton kernels when Triton is installed) with their fake kernels and autograd formulas.
"""

import torch  # noqa: F401  (loads libtorch / libc10, which _C links against)

# credit_ops._C registers the C++/CUDA ops. It is compiled at install time when the build sees torch
# (pip install --no-build-isolation, make build), else here, once per torch version, into a cache
# (credit_ops/_extension.py; `python -m credit_ops.build` does it ahead of time). A _C built for another torch
# is never loaded. Without a compiler: None, a warning, and the compiled ops raise a clear error.
from credit_ops._extension import load_or_stub as _load_or_stub  # noqa: E402

_C = _load_or_stub()

from credit_ops import _autograd, _meta, _triton_ops  # noqa: F401,E402,I001  (registration side effects)
from credit_ops._backend import get_backend, use_backend  # noqa: E402
from credit_ops._checks import set_value_checks  # noqa: E402
from credit_ops.ops.credit_assign import CreditAssignment, credit_assign  # noqa: E402
from credit_ops.ops.advantages import group_advantages, ibpo_shaping, token_advantages  # noqa: E402
from credit_ops.ops.align_edits import AlignEdits, align_edits, segment_steps, step_masks, truncate_regions  # noqa: E402
from credit_ops.ops.fused_linear import fused_linear_logprobs, fused_linear_policy_loss  # noqa: E402
from credit_ops.ops.policy_loss import policy_loss, policy_loss_from_logprobs  # noqa: E402
from credit_ops.ops.token_logprobs import token_logprobs  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AlignEdits",
    "CreditAssignment",
    "align_edits",
    "credit_assign",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "get_backend",
    "group_advantages",
    "ibpo_shaping",
    "policy_loss",
    "policy_loss_from_logprobs",
    "segment_steps",
    "set_value_checks",
    "step_masks",
    "token_advantages",
    "token_logprobs",
    "truncate_regions",
    "use_backend",
]
