"""Launch-configuration sweep of the Triton token_logprobs forward on a GPU (BLOCK_V x num_warps), against the
copy bandwidth, to choose the defaults in triton_kernels/token_logprobs.py. Run by scripts/gpu_check.sh.

    python benchmarks/sweep_token_logprobs.py [B T V]
"""

import sys

import torch
import triton.testing
from credit_ops.triton_kernels.token_logprobs import token_logprobs_forward


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


if __name__ == "__main__":
    main()
