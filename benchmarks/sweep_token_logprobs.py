"""Launch-configuration sweeps on a GPU, against the copy bandwidth: the Triton token_logprobs forward (BLOCK_V x
num_warps; the defaults in triton_kernels/token_logprobs.py), then the policy loss's long-row layouts (the two-pass
Triton kernel's tile x num_warps, and the Hopper cluster kernel where it runs; the kernels in
triton_kernels/policy_loss.py, the shared tile in triton_kernels/softmax_rows.py, the rule in
credit_ops/ops/policy_loss.py), each with a separate gradient buffer
and in place. Run by scripts/gpu_check.sh.

    python benchmarks/sweep_token_logprobs.py [B T V]
"""

import os
import sys

import torch
import triton.testing
from credit_ops.triton_kernels import softmax_rows as sr
from credit_ops.triton_kernels.token_logprobs import token_logprobs_forward

from credit_ops.ops.policy_loss import cluster_ok, rows_forward


def main():
    B, T, V = (int(a) for a in sys.argv[1:4]) if len(sys.argv) >= 4 else (8, 2048, 151936)
    full = (torch.randn(B, T + 1, V, device="cuda") * 3).bfloat16()
    logits, labels = full[:, :-1], torch.randint(0, V, (B, T), device="cuda")
    src = torch.empty(1 << 29, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_bw = 2 * src.numel() * 4 / copy_ms / 1e6  # GB/s
    nbytes = logits.numel() * 2
    print(f"copy {copy_bw:.0f} GB/s; floor for one read: {nbytes / copy_bw / 1e6:.3f} ms")
    print("entropy block warps    ms   frac_of_copy")
    configs = [(False, 2048, 2), (False, 4096, 4)] + [(True, b, w) for b in (1024, 2048, 4096) for w in (2, 4)]
    for entropy, block, warps in configs:
        ms = triton.testing.do_bench(
            lambda e=entropy, b=block, w=warps: token_logprobs_forward(logits, labels, 1.0, -100, e, b, w),
            return_mode="median",
        )
        print(f"{entropy!s:7} {block:5} {warps:5} {ms:7.3f}  {nbytes / ms / 1e6 / copy_bw:.3f}")
    sweep_policy_loss(logits.contiguous(), labels, copy_bw)


def sweep_policy_loss(logits, labels, copy_bw):
    """dapo loss + gradient over (B, T, V) logits: each layout forced; bytes = one read + one write (the floor)."""
    B, T, V = logits.shape
    tok = [torch.randn(B, T, device="cuda") for _ in range(2)]
    with torch.no_grad():
        cur = token_logprobs_forward(logits, labels, 1.0, -100, False)[0]
    args = (labels, tok[0], tok[1].sigmoid() / (B * T), cur + 0.1, cur - 0.1)
    kw = dict(temperature=1.0, ignore_index=-100, eps_low=0.2, eps_high=0.28, beta=0.04, kl_type=3)
    grad = torch.empty_like(logits)
    scratch = logits.clone()
    nbytes = 2 * logits.numel() * logits.element_size()
    print("policy layout tile warps inplace   ms   frac_of_copy (one read + one write)")
    configs = [("two_pass", sr.STREAM_BLOCK, sr.STREAM_WARPS)]  # the default, first
    configs += [("two_pass", t, w) for t in (2048, 4096, 8192) for w in (4, 8, 16)]
    if cluster_ok(logits):
        configs.append(("cluster", 0, 0))
    default = (sr.STREAM_BLOCK, sr.STREAM_WARPS)  # shared with token_logprobs: its log-probs change with them
    for layout, tile, warps in configs:
        os.environ["CREDIT_OPS_ROWS_LAYOUT"] = layout
        sr.STREAM_BLOCK, sr.STREAM_WARPS = (tile, warps) if tile else default
        for inplace in (False, True):
            x, g = (scratch, scratch) if inplace else (logits, grad)  # in place: later runs read gradients (same work)
            ms = triton.testing.do_bench(
                lambda x=x, g=g: rows_forward(g, x, *args, use_triton=True, **kw), return_mode="median"
            )
            print(f"policy {layout:9} {tile:5} {warps:5} {inplace!s:7} {ms:7.3f}  {nbytes / ms / 1e6 / copy_bw:.3f}")
    sr.STREAM_BLOCK, sr.STREAM_WARPS = default
    os.environ.pop("CREDIT_OPS_ROWS_LAYOUT")


if __name__ == "__main__":
    main()
