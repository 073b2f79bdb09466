"""credit_ops.integrations.verl: verl's policy-loss registry, its aggregation and the advantage-step hook.

The verl tests need verl 0.9.x installed without its dependencies (requirements-verl.txt); they are skipped
without it. The rest (lazy import, the tensor core of the hook, the post-import registration) needs no verl.
"""

import importlib.metadata
import itertools
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import credit_ops
from credit_ops.integrations import verl as cv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"]
PLUGIN = "credit_ops.integrations.verl_plugin"


@pytest.fixture(scope="module")
def core_algos():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    cv.register()
    return core_algos


def actor_config(**kw):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1, **kw)


def loss_batch(B=6, T=9):
    """Log-probs with partial rows, one fully masked row and log-ratios beyond verl's clamps."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, :] = False  # fully masked: left out of verl's sequence means
    mask[4, 2:] = False
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    old[0, 0] = logp[0, 0] + 25  # token log-ratio -25 (vanilla's clamp at -20)
    old[2, 1] = logp[2, 1] - 30  # +30 (clamp at +20)
    old[5] = logp[5] - 12  # sequence log-ratio 12 (gspo's clamp at 10)
    adv = torch.randn(B, T, generator=g)
    adv[5] = -adv[5].abs()  # a clamped sequence with A < 0: the unclamped loss would have a large gradient
    weights = 2 * torch.rand(B, T, generator=g)
    return logp, old, adv, mask, weights


def run_loss(fn, old, logp, adv, mask, mode, config, weights):
    leaf = logp.clone().requires_grad_(True)
    loss, metrics = fn(old, leaf, adv, mask, mode, config, weights)
    loss.backward()
    return loss.detach(), leaf.grad, metrics


def assert_same(a, b, tol=1e-6):
    (la, ga, ma), (lb, gb, mb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)
    for key in mb:  # verl's metric keys (the credit-ops losses may add their own)
        assert ma[key] == pytest.approx(mb[key], abs=tol), key


# ---- no verl needed
def test_import_does_not_need_verl():
    """credit_ops and the integration module import, and the tensor core runs, with verl unimportable."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["verl"] = None  # import verl raises ImportError
        import torch, credit_ops
        import credit_ops.integrations.verl as cv
        tokens, scores = torch.tensor([[1, 2], [3, 4]]), torch.tensor([1.0, 0.0])
        out = cv.credit_advantages(tokens, torch.ones(2, 2), ["a", "a"], scores)
        assert out.advantages.shape == (2, 2)
        try:
            cv.register()
        except ImportError:
            print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def verl_style_batch():
    """6 responses of 2 prompts (uid strings, right padding, a tool token masked out of the loss), two repairs."""
    responses = torch.tensor(
        [
            [5, 6, 7, 8, 9, 0],
            [5, 6, 1, 8, 0, 0],
            [5, 6, 7, 2, 9, 3],
            [4, 4, 4, 0, 0, 0],
            [4, 3, 4, 4, 0, 0],
            [4, 4, 4, 4, 4, 0],
        ]
    )
    lengths = torch.tensor([5, 4, 6, 3, 4, 5])
    mask = (torch.arange(6) < lengths[:, None]).long()
    mask[2, 3] = 0  # a tool token inside the response
    uid = ["p0", "p0", "p0", "p1", "p1", "p1"]
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    repairs = [[], [[5, 6, 7, 8]], [[5, 6, 7, 8, 9], [1, 1]], [], [[4, 4, 4, 4]], []]
    correct = [[], [True], [True, False], [], [False], []]
    return responses, lengths, mask, uid, scores, repairs, correct


@pytest.mark.parametrize("algorithm", ["ibpo", "diff_feedback", "iop", "grpo"])
def test_credit_advantages_matches_credit_assign(algorithm):
    responses, lengths, mask, uid, scores, repairs, correct = verl_style_batch()
    out = cv.credit_advantages(
        responses, mask, uid, scores, repairs, correct, response_lengths=lengths, algorithm=algorithm
    )
    direct = credit_ops.credit_assign(
        responses,
        lengths,
        torch.tensor([0, 0, 0, 1, 1, 1]),
        scores,
        torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9], [1, 1, 0, 0, 0], [4, 4, 4, 4, 0]]),
        torch.tensor([4, 5, 2, 4]),
        torch.tensor([1, 2, 2, 4]),
        torch.tensor([True, True, False, False]),
        algorithm=algorithm,
        train_on_repair=False,
    )
    torch.testing.assert_close(out.advantages, direct.advantages * mask, rtol=0, atol=0)
    torch.testing.assert_close(out.gates, direct.gates * mask, rtol=0, atol=0)
    assert out.metrics == {f"credit/{k}": pytest.approx(float(v)) for k, v in direct.metrics.items()}
    if algorithm != "grpo":
        assert out.assignment.has_repair.tolist() == [False, True, True, False, False, False]
        assert out.advantages[2, 3] == 0  # the masked tool token


def test_credit_advantages_options():
    responses, lengths, mask, uid, scores, repairs, correct = verl_style_batch()
    # lengths default to the last masked-in token; norm_adv_by_std=False is Dr. GRPO's group mean only
    a = cv.credit_advantages(responses, mask, uid, scores, algorithm="grpo", norm_adv_by_std=False)
    mean = torch.tensor([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    torch.testing.assert_close(a.advantages, ((scores - mean)[:, None] * mask).float())
    # token-level scores are summed per row, as verl's outcome estimators do
    token_scores = torch.zeros(6, 6)
    token_scores[torch.arange(6), lengths - 1] = scores
    b = cv.credit_advantages(responses, mask, uid, token_scores, repairs, correct, response_lengths=lengths)
    c = cv.credit_advantages(responses, mask, uid, scores, repairs, correct, response_lengths=lengths)
    torch.testing.assert_close(b.advantages, c.advantages)
    with pytest.raises(ValueError, match="train_on_repair"):
        cv.credit_advantages(responses, mask, uid, scores, train_on_repair=True)
    with pytest.raises(ValueError, match="verification"):
        cv.credit_advantages(responses, mask, uid, scores, repairs, [[], [], [], [], [], []])


def test_credit_settings():
    s = cv.credit_settings({"credit_ops": {"algorithm": "iop", "k": 1, "explicit_gates": True}})
    assert s == cv.CreditSettings("iop", True, {"k": 1})
    assert cv.credit_settings({}) == cv.CreditSettings("ibpo", False, {})
    with pytest.raises(ValueError, match="unknown credit_ops settings"):
        cv.credit_settings({"credit_ops": {"rhoo": 1}})
    with pytest.raises(ValueError, match="algorithm"):
        cv.credit_settings({"credit_ops": {"algorithm": "ppo"}})


def test_after_import_hook(tmp_path, monkeypatch):
    """The post-import hook that registers the trainers runs once the watched module has executed."""
    pkg = tmp_path / "credit_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    cv.after_import("credit_fake_pkg", lambda m: seen.append(m.VALUE + 1))
    assert seen == []
    import credit_fake_pkg  # noqa: F401

    assert seen == [42]
    assert not any(isinstance(f, cv._AfterImport) and f.name == "credit_fake_pkg" for f in sys.meta_path)
    cv.after_import("credit_fake_pkg", lambda m: seen.append(0))  # already imported: runs at once
    assert seen == [42, 0]
    del sys.modules["credit_fake_pkg"]


def test_register_trainers_wraps_every_mode():
    class PPOTrainer:
        def _compute_advantage(self, batch, metrics):
            return batch

    class PPOTrainerSync(PPOTrainer):
        pass

    registry = {"sync": PPOTrainerSync}

    def register_trainer(name):
        def deco(cls):
            assert name not in registry
            registry[name] = cls
            return cls

        return deco

    module = types.SimpleNamespace(TRAINER_REGISTRY=registry, register_trainer=register_trainer)
    assert cv.register_trainers(module) == ["credit_ops_sync"]
    assert cv.register_trainers(module) == ["credit_ops_sync"]  # idempotent
    cls = registry["credit_ops_sync"]
    assert issubclass(cls, PPOTrainerSync) and cls.__mro__[1] is cv.CreditAdvantageMixin


# ---- verl's own losses
@pytest.mark.parametrize(
    "name, verl_name, clip, mode, use_weights, global_batch",
    [
        (n, v, c, m, w, gb)
        for (n, v, c), m, w, gb in itertools.product(
            [
                ("credit_ops_vanilla", "vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.28)),
                ("credit_ops_vanilla", "vanilla", dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_c=1.5)),
                ("credit_ops_gspo", "gspo", dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4)),
            ],
            AGG_MODES,
            [False, True],
            [False, True],
        )
    ],
)
def test_parity_with_verl(core_algos, name, verl_name, clip, mode, use_weights, global_batch):
    """Loss, gradient and metrics equal verl's own loss: every loss_agg_mode, a fully masked row, rollout IS
    weights, dual clip, log-ratios past verl's clamps, and verl's global-batch normalisation."""
    logp, old, adv, mask, weights = loss_batch()
    config = actor_config(**clip)
    if global_batch:
        config.global_batch_info.update(dp_size=2, batch_num_tokens=50, global_batch_size=10, loss_scale_factor=7)
    w = weights if use_weights else None
    ours = run_loss(core_algos.get_policy_loss_fn(name), old, logp, adv, mask, mode, config, w)
    theirs = run_loss(core_algos.get_policy_loss_fn(verl_name), old, logp, adv, mask, mode, config, w)
    assert_same(ours, theirs)
    assert torch.isfinite(ours[1]).all() and ours[1][~mask].eq(0).all()


def test_parity_needs_the_clamps(core_algos):
    """Negative control: without verl's sequence clamp the clamped row (A < 0) would get a large gradient."""
    logp, old, adv, mask, _ = loss_batch()
    config = actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    theirs = run_loss(core_algos.get_policy_loss_fn("gspo"), old, logp, adv, mask, "token-mean", config, None)
    leaf = logp.clone().requires_grad_(True)
    raw, _ = credit_ops.policy_loss_from_logprobs(
        leaf, adv, old_logprobs=old, mask=mask, loss_type="gspo_token", eps_low=3e-4, eps_high=4e-4, reduction="none"
    )
    core_algos.agg_loss(raw, mask, "token-mean").backward()
    assert (leaf.grad[5] - theirs[1][5]).abs().max() > 1.0
    assert theirs[1][5].abs().max() == 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gated_gspo(core_algos, mode):
    """With sequence-constant advantages every valid token is gated: gated GSPO = GSPO = verl's gspo (GSPO-token
    equals GSPO then). With binary gates folded into the advantages it equals credit-ops' gated_gspo with those
    gates, aggregated by verl."""
    logp, old, _, mask, _ = loss_batch()
    old = logp + 0.01 * (old - logp)  # inside the tight GSPO band, so most tokens carry gradient
    config = actor_config(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    seq_adv = torch.linspace(-1.5, 1.2, 6)[:, None].expand(6, 9).contiguous()
    gspo = run_loss(core_algos.get_policy_loss_fn("gspo"), old, logp, seq_adv, mask, mode, config, None)
    for name in ("credit_ops_gated_gspo", "credit_ops_gspo_seq"):
        ours = run_loss(core_algos.get_policy_loss_fn(name), old, logp, seq_adv, mask, mode, config, None)
        assert_same(ours, gspo, tol=1e-6)

    gates = (torch.rand(6, 9, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    adv = seq_adv * gates
    ours = run_loss(cv.credit_ops_gated_gspo, old, logp, adv, mask, mode, config, None)
    leaf = logp.clone().requires_grad_(True)
    per_token, _ = credit_ops.policy_loss_from_logprobs(
        leaf,
        adv,
        old_logprobs=old,
        mask=mask,
        gates=gates,
        loss_type="gated_gspo",
        eps_low=3e-4,
        eps_high=4e-4,
        reduction="none",
    )
    direct = core_algos.agg_loss(per_token, mask, mode)
    direct.backward()
    torch.testing.assert_close(ours[0], direct.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ours[1], leaf.grad, rtol=0, atol=0)
    assert ours[2]["actor/credit_gated_frac"] == pytest.approx(float((gates.bool() & mask).sum() / mask.sum()))


def worker_data(gates=None):
    """A micro-batch as verl's engine hands it to its loss function: nested (jagged) tensors per sample."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(1)
    P, R = [3, 2, 4], [5, 1, 3]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)
    fields = {
        "prompts": nested([torch.randint(0, 9, (p,), generator=g) for p in P]),
        "responses": nested([torch.randint(0, 9, (r,), generator=g) for r in R]),
        "response_mask": nested([torch.ones(r, dtype=torch.int64) for r in R]),
        "old_log_probs": nested([-torch.rand(r, generator=g) for r in R]),
        "advantages": nested([torch.randn(r, generator=g) for r in R]),
    }
    if gates is not None:
        fields[cv.GATES_KEY] = nested(gates)
    data = TensorDict(fields, batch_size=len(P))
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    log_probs = [-torch.rand(p + r, generator=g) for p, r in zip(P, R, strict=True)]
    return data, log_probs, R


@pytest.mark.parametrize("loss_mode", ["credit_ops_vanilla", "credit_ops_gated_gspo"])
def test_credit_ppo_loss_explicit_gates(core_algos, loss_mode):
    """credit_ppo_loss = verl's ppo_loss with the batch's credit_gates reaching the credit-ops loss."""
    from verl.workers.config.actor import PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss

    gates = [torch.tensor([1.0, 0.5, 0.0, 1.0, 0.25]), torch.tensor([1.0]), torch.tensor([0.0, 1.0, 1.0])]
    data, log_probs, R = worker_data(gates)
    clip = dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4) if "gspo" in loss_mode else {}
    config = actor_config(policy_loss=PolicyLossConfig(loss_mode=loss_mode), **clip)
    leaves = [x.clone().requires_grad_(True) for x in log_probs]
    model_output = {"log_probs": torch.nested.as_nested_tensor(leaves, layout=torch.jagged)}
    loss, metrics = cv.credit_ppo_loss(config, model_output, data)
    assert "actor/pg_loss" in metrics

    padded = data.select("response_mask", "old_log_probs", "advantages", cv.GATES_KEY).to_padded_tensor()
    lp = torch.nn.utils.rnn.pad_sequence([x[-r - 1 : -1] for x, r in zip(log_probs, R, strict=True)], batch_first=True)
    mask = padded["response_mask"].bool()
    per_token, _ = credit_ops.policy_loss_from_logprobs(
        lp,
        padded["advantages"],
        old_logprobs=padded["old_log_probs"],
        mask=mask,
        gates=padded[cv.GATES_KEY],
        loss_type=cv.LOSS_MODES[loss_mode],
        dual_clip=3.0 if loss_mode == "credit_ops_vanilla" else None,
        eps_low=config.clip_ratio_low,
        eps_high=config.clip_ratio_high,
        reduction="none",
    )
    torch.testing.assert_close(loss.detach(), core_algos.agg_loss(per_token, mask, "token-mean"), rtol=0, atol=1e-7)
    # verl's own losses never see the gates, and without the field it is verl's ppo_loss
    detached = {"log_probs": model_output["log_probs"].detach()}
    verl_config = actor_config(policy_loss=PolicyLossConfig(loss_mode="vanilla"))
    a, _ = cv.credit_ppo_loss(verl_config, detached, worker_data(gates)[0])
    b, _ = ppo_loss(verl_config, detached, worker_data()[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a, _ = cv.credit_ppo_loss(config, detached, worker_data()[0])
    b, _ = ppo_loss(config, detached, worker_data()[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grpo_credit_equals_verl_grpo(core_algos):
    """algorithm='grpo' without repairs reproduces verl's grpo estimator (groups of two or more)."""
    from verl.trainer.config import AlgoConfig

    responses, lengths, mask, uid, scores, _, _ = verl_style_batch()
    token_scores = torch.zeros(6, 6)
    token_scores[torch.arange(6), lengths - 1] = scores
    for norm in (True, False):
        ours = cv.credit_advantages(responses, mask, uid, token_scores, algorithm="grpo", norm_adv_by_std=norm)
        theirs, _ = core_algos.get_adv_estimator_fn("grpo")(
            token_level_rewards=token_scores,
            response_mask=mask,
            index=__import__("numpy").array(uid, dtype=object),
            norm_adv_by_std_in_grpo=norm,
            config=AlgoConfig(),
        )
        torch.testing.assert_close(ours.advantages, theirs.float(), rtol=1e-6, atol=1e-6)


def test_trainer_hook_on_a_batch(core_algos, monkeypatch):
    """CreditAdvantageMixin._compute_advantage on a batch laid out as verl's agent loop stores it in the
    TransferQueue (a fake queue here), against credit_assign called directly."""
    from omegaconf import OmegaConf
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    responses, lengths, mask, uid, scores, repairs, correct = verl_style_batch()
    samples = []
    for i in range(6):
        n = int(lengths[i])
        rm = torch.zeros(n)
        rm[-1] = scores[i]
        extra = {"credit_repairs": repairs[i], "credit_repairs_correct": correct[i]}
        if i == 4:  # repairs reported by the reward function instead
            extra = {"reward_extra_info": {"score": 0.0, **extra}}
        samples.append(
            {
                "uid": uid[i],
                "responses": responses[i, :n],
                "response_mask": mask[i, :n],
                "rm_scores": rm,
                "extra_fields": extra,
            }
        )
    # verl's padding row (balance_batch) copies a real sample's fields under its own uid
    samples.append({**samples[1], "uid": "pad0", "response_mask": torch.zeros(4, dtype=torch.int64)})
    store = list_of_dict_to_tensordict(samples)
    written = {}

    class FakeQueue:
        @staticmethod
        def kv_batch_get(keys, partition_id, select_fields):
            return store.select(*select_fields)

        @staticmethod
        def kv_batch_put(keys, partition_id, fields):
            written.update(fields.items())
            return batch

    class Batch:
        keys = [f"{u}_{s}_0" for s, u in enumerate(uid + ["pad0"])]
        partition_id = "train"
        tags = [{}] * 6 + [{"is_padding": True}]

        def __len__(self):
            return 7

    batch = Batch()

    class VerlTrainer:  # what the mixin needs of PPOTrainer
        def __init__(self, config):
            self.config = config

        def _compute_advantage(self, batch, metrics):
            metrics["verl_step"] = 1.0
            return batch

    class Trainer(cv.CreditAdvantageMixin, VerlTrainer):
        pass

    monkeypatch.setattr(cv, "_transfer_queue", lambda: FakeQueue)
    config = OmegaConf.create(
        {
            "algorithm": {"norm_adv_by_std_in_grpo": True, "use_kl_in_reward": False},
            "actor_rollout_ref": {"actor": {"policy_loss": {"loss_mode": "credit_ops_vanilla"}}},
            "credit_ops": {"algorithm": "ibpo", "explicit_gates": True, "max_edit_ratio": 0.5},
        }
    )
    metrics = {}
    assert Trainer(config)._compute_advantage(batch, metrics) is batch
    expected = cv.credit_advantages(
        responses, mask, uid, scores, repairs, correct, response_lengths=lengths, algorithm="ibpo"
    )
    got = written["advantages"].to_padded_tensor(0.0)
    torch.testing.assert_close(got[:6], expected.advantages, rtol=0, atol=0)
    assert got[6].eq(0).all()  # the padding row
    torch.testing.assert_close(written[cv.GATES_KEY].to_padded_tensor(0.0)[:6], expected.gates, rtol=0, atol=0)
    assert written["advantages"].offsets().diff().tolist() == [5, 4, 6, 3, 4, 5, 4]
    assert metrics["verl_step"] == 1.0
    assert metrics["credit/repair_success_rate"] == pytest.approx(expected.metrics["credit/repair_success_rate"])


def test_entry_point_registers_in_a_fresh_interpreter():
    """Installing credit-ops is all it takes: `import verl` loads the verl.plugins entry point in every process.
    Needs `[verl.plugins] credit_ops = credit_ops.integrations.verl_plugin` in the installed metadata."""
    pytest.importorskip("verl", reason="verl is not installed")
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert PLUGIN in [ep.value for ep in eps], f"no verl.plugins entry point for {PLUGIN}: {list(eps)}"
    code = textwrap.dedent(
        """
        import sys
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        print(sorted(n for n in POLICY_LOSS_REGISTRY if n.startswith("credit_ops")))
        print(any(type(f).__name__ == "_AfterImport" for f in sys.meta_path))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    names, hook = res.stdout.strip().splitlines()[-2:]
    assert names == str(sorted(cv.POLICY_LOSSES))
    assert hook == "True"
