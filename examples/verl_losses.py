"""credit-ops inside verl, offline on the CPU in seconds: the trainer hook's credit on a verl-shaped batch, then the
registered losses, looked up by name in verl's own registry, against verl's vanilla and gspo losses.

    pip install --no-deps -r requirements-verl.txt   # verl 0.9.1 without its dependencies (see the file)
    python examples/verl_losses.py
"""

import torch
from verl.trainer.ppo import core_algos  # `import verl` loads credit-ops' verl.plugins entry point
from verl.workers.config import ActorConfig

from credit_ops.integrations import verl as credit_verl

if "credit_ops_vanilla" not in core_algos.POLICY_LOSS_REGISTRY:  # credit-ops installed without its entry point
    credit_verl.register()
print("credit-ops losses in verl's registry:", sorted(n for n in core_algos.POLICY_LOSS_REGISTRY if "credit" in n))

# One prompt, four sampled responses (token ids; 0 pads), as verl's rollout stores them: two correct, two wrong;
# the reward function (or an agent loop) reported a verified repair of response 1 (one token changed) and one of
# response 3, which rewrites 6 of its 8 tokens: a rewrite, not a repair, rejected by max_edit_ratio=0.5.
responses = torch.tensor(
    [
        [11, 12, 13, 14, 15, 16, 0, 0],
        [11, 12, 17, 14, 15, 16, 0, 0],  # wrong at its third token
        [11, 12, 13, 14, 15, 16, 18, 0],
        [11, 19, 19, 19, 19, 19, 19, 19],  # wrong from its second token on
    ]
)
lengths = torch.tensor([6, 6, 7, 8])
response_mask = (torch.arange(8) < lengths[:, None]).long()
uid = ["prompt-0"] * 4
scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
repairs = [[], [[11, 12, 13, 14, 15, 16]], [], [[11, 12, 13, 14, 15, 16, 18]]]
repairs_correct = [[], [True], [], [True]]

for algorithm in ("grpo", "ibpo", "iop"):
    credit = credit_verl.credit_advantages(
        responses, response_mask, uid, scores, repairs, repairs_correct, response_lengths=lengths, algorithm=algorithm
    )
    print(f"\n{algorithm}: per-token advantages (what the hook writes to the batch)")
    for row in credit.advantages:
        print("  " + " ".join(f"{v:+.2f}" for v in row.tolist()))
    print("  " + ", ".join(f"{k.split('/')[1]}={v:.3g}" for k, v in credit.metrics.items()))

# The losses: the same per-token advantages through verl's own loss and credit-ops', every aggregation mode.
ibpo = credit_verl.credit_advantages(
    responses, response_mask, uid, scores, repairs, repairs_correct, response_lengths=lengths
).advantages
g = torch.Generator().manual_seed(0)
log_prob = -2 * torch.rand(4, 8, generator=g)
old_log_prob = log_prob + 0.2 * torch.randn(4, 8, generator=g)
rollout_is_weights = 0.5 + torch.rand(4, 8, generator=g)
mask = response_mask.bool()
print("\nloss and max |d loss / d log_prob| difference, verl vs credit-ops (IBPO advantages, rollout IS weights)")
for verl_name, ours, clip in [
    ("vanilla", "credit_ops_vanilla", (0.2, 0.28)),
    ("gspo", "credit_ops_gspo", (3e-4, 4e-4)),
]:
    config = ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=4,
        ppo_micro_batch_size_per_gpu=2,
        rollout_n=4,
        clip_ratio_low=clip[0],
        clip_ratio_high=clip[1],
    )
    for mode in ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        results = []
        for name in (verl_name, ours):
            leaf = log_prob.clone().requires_grad_(True)
            loss, metrics = core_algos.get_policy_loss_fn(name)(
                old_log_prob, leaf, ibpo, mask, mode, config, rollout_is_weights
            )
            loss.backward()
            results.append((loss.item(), leaf.grad))
        (a, ga), (b, gb) = results
        print(f"  {verl_name:8s} {mode:24s} {a:+.6f} {b:+.6f}  |dgrad| {(ga - gb).abs().max().item():.1e}")

# IOP: gated GSPO, the gates riding in the advantages (1 where the advantage is nonzero).
iop = credit_verl.credit_advantages(
    responses, response_mask, uid, scores, repairs, repairs_correct, response_lengths=lengths, algorithm="iop"
)
config = ActorConfig(
    strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=4, clip_ratio_low=3e-4
)
loss, metrics = core_algos.get_policy_loss_fn("credit_ops_gated_gspo")(
    old_log_prob, log_prob, iop.advantages, mask, "seq-mean-token-mean", config, None
)
print(f"\niop with credit_ops_gated_gspo: loss {loss.item():+.6f}, metrics {metrics}")
