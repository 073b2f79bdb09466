"""The VLM path (trainer/vision.py, trainer/visual_task.py): the tiny Qwen2-VL, our processor, mrope-consistent
log-probs, multimodal row selection, the 7-segment digit task, vjsonl datasets, and short training runs."""

import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch
from credit_ops.trainer.config import ConfigError, load_config
from credit_ops.trainer.rollout import Samples, forward_logits, generate, pack, sequence_logprobs
from credit_ops.trainer.tasks import oracle_repair
from credit_ops.trainer.vision import (
    SPECIALS,
    VisionProcessor,
    check_image_tokens,
    generate_kwargs,
    prompt_inputs,
    tiny_image_processor,
    tiny_vlm,
    vlm_tokenizer,
)
from credit_ops.trainer.visual_task import NEIGHBOURS, DigitTask, VisualJsonlTask, render_digits, write_dataset

import credit_ops

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
WARM_STEPS = 600


def _cfg(**kw):
    base = dict(
        task__name="visual",
        model__arch="qwen2_vl",
        warm_start__steps=0,
        rollout__max_new_tokens=32,
        progress=False,
        report=False,
        threads=1,
    )
    return load_config(**{**base, **kw})


@pytest.fixture(scope="module")
def vlm():
    """A random tiny Qwen2-VL and its tokenizer (processor attached as tok.vision)."""
    torch.manual_seed(0)
    tok = vlm_tokenizer()
    tok.vision = VisionProcessor(tok, tiny_image_processor())
    model = tiny_vlm(_cfg(), tok).eval()
    return model, tok


def _problems(ns=(3, 2, 3, 2), seed=0):
    """Problems of different digit counts: images of different widths, prompts of different lengths."""
    gen = torch.Generator().manual_seed(seed)
    return [DigitTask(n, "+-").sample(1, gen)[0] for n in ns]


# ---- processor
def test_processor_shapes_and_token_counts(vlm):
    _, tok = vlm
    vp = tok.vision
    probs = _problems((3, 2))
    enc = vp.encode([p.prompt for p in probs], [p.image for p in probs])
    assert enc["image_grid_thw"].tolist() == [[1, 2, 6], [1, 2, 4]]  # 48x16 and 32x16 images, 8 px patches
    assert enc["pixel_values"].shape == (12 + 8, 3 * 2 * 8 * 8)
    ids = enc["input_ids"]
    assert (ids == vp.image_token_id).sum(-1).tolist() == [3, 2]  # one image token per 16x16 cell
    assert torch.equal(enc["mm_token_type_ids"], (ids == vp.image_token_id).long())
    # left padding: the shorter row (2 image tokens, 4-character prompt) starts with pads
    lens = enc["attention_mask"].sum(-1).tolist()
    assert lens == [1 + 1 + 3 + 1 + 6, 1 + 1 + 2 + 1 + 4]
    assert enc["attention_mask"][1, : lens[0] - lens[1]].sum() == 0 and enc["attention_mask"][:, -1].all()
    row = ids[0].tolist()
    assert tok.decode(row, skip_special_tokens=True) == probs[0].prompt  # specials dropped on decode
    assert row[:3] == [tok.bos_token_id, vp.vision_start_id, vp.image_token_id]
    # the character ids are the text tokenizer's; the specials come after them
    from credit_ops.trainer.modeling import char_tokenizer

    text = char_tokenizer()
    assert tok("A+B=")["input_ids"] == text("A+B=")["input_ids"]
    assert min(tok.convert_tokens_to_ids(s) for s in SPECIALS) == len(text)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision (an optional test dependency) is not installed")
def test_processor_equals_official(vlm):
    """Field by field, our encode equals Qwen2VLProcessor's output (its video processor needs torchvision)."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    _, tok = vlm
    vp = tok.vision
    official = Qwen2VLProcessor(image_processor=tiny_image_processor(), tokenizer=tok,
                                video_processor=Qwen2VLVideoProcessor())  # fmt: skip
    probs = _problems((3, 2, 3))
    texts = [f"{tok.bos_token}<|vision_start|><|image_pad|><|vision_end|>{p.prompt}" for p in probs]
    ref = official(text=texts, images=[p.image for p in probs], padding=True, return_tensors="pt")
    ours = vp.encode([p.prompt for p in probs], [p.image for p in probs])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key].to(ours[key].dtype)), key


def test_image_token_count_must_match(vlm):
    _, tok = vlm
    probs = _problems((3, 2))
    ids, images = prompt_inputs(tok, probs)
    batch = torch.tensor([ids[0]])
    check_image_tokens(batch, images[:1])
    with pytest.raises(ValueError, match="1 image tokens|3 image tokens in the prompt, but its image has 2"):
        check_image_tokens(batch, images[1:])  # row 0's 3 image tokens against a 2-token image


# ---- log-probs: forward (mrope from the batch) == generate
def test_forward_logprobs_equal_generate(vlm):
    model, tok = vlm
    probs = _problems((3, 2, 3, 2))
    ids, images = prompt_inputs(tok, probs)
    assert len({len(i) for i in ids}) == 2  # left padding really happens
    G, P = 3, max(len(i) for i in ids)
    inp = torch.tensor([[tok.pad_token_id] * (P - len(i)) + i for i in ids])
    attn = (torch.arange(P) >= torch.tensor([P - len(i) for i in ids])[:, None]).long()
    torch.manual_seed(1)
    out = model.generate(
        input_ids=inp, attention_mask=attn, do_sample=True, max_new_tokens=12, num_return_sequences=G,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, output_logits=True,
        return_dict_in_generate=True, **generate_kwargs(tok, inp, images),
    )  # fmt: skip
    comp = out.sequences[:, P:]
    completions = []
    for row in comp.tolist():
        completions.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    gen_logits = torch.stack(out.logits, 1)  # (B*G, L, V), suppressed tokens at -inf
    rows = [ids[i // G] for i in range(len(completions))]
    batch = pack(rows, completions, tok.pad_token_id, "cpu", images=[images[i // G] for i in range(len(completions))])
    assert batch.position_ids is None
    lp = sequence_logprobs(model, batch)
    ref = credit_ops.token_logprobs(gen_logits[:, : batch.C], batch.labels)
    assert torch.allclose(lp[batch.valid], ref[batch.valid], atol=1e-5)

    # the text path's 1-D positions are not what the model saw
    wrong = dataclasses.replace(batch, position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        lp_wrong = credit_ops.token_logprobs(forward_logits(model, wrong), batch.labels)
    assert (lp_wrong - lp)[batch.valid].abs().max() > 1e-4
    assert batch.rows(slice(0, 2)).position_ids is None  # and selecting rows never brings 1-D positions back
    # a different image changes the log-probs
    other = pack(rows, completions, tok.pad_token_id, "cpu",
                 images=[images[(i // G + 2) % len(images)] for i in range(len(completions))])  # fmt: skip
    assert (sequence_logprobs(model, other) - lp)[batch.valid].abs().max() > 1e-4

    # the fused head path: the VLM's last hidden states times the LM head give the same log-probs
    from credit_ops.trainer.rollout import forward_hidden

    hidden = forward_hidden(model, batch)
    logits = hidden @ model.get_output_embeddings().weight.T
    assert torch.allclose(credit_ops.token_logprobs(logits, batch.labels)[batch.valid], lp[batch.valid], atol=1e-5)


def test_rows_regather_pixels(vlm):
    model, tok = vlm
    probs = _problems((3, 2, 2, 3, 3, 2))
    ids, images = prompt_inputs(tok, probs)
    completions = [tok(f"A={k};#{k}")["input_ids"] + [tok.eos_token_id] for k in range(len(ids))]
    batch = pack(ids, completions, tok.pad_token_id, "cpu", images=images)
    full = sequence_logprobs(model, batch)
    assert torch.allclose(sequence_logprobs(model, batch, micro_batch=4), full, atol=1e-6)  # 4 + 2 rows
    idx = torch.tensor([4, 1, 5])
    part = batch.rows(idx)
    assert part.image_grid_thw.tolist() == [images[i].grid_thw.tolist() for i in idx]
    assert torch.equal(part.pixel_values, torch.cat([images[i].pixel_values for i in idx]))
    assert torch.allclose(sequence_logprobs(model, part), full[idx], atol=1e-6)


def test_vision_specials_never_sampled(vlm):
    model, tok = vlm
    probs = _problems((3, 2, 3, 2))
    ids, images = prompt_inputs(tok, probs)
    torch.manual_seed(0)
    completions, _ = generate(model, tok, ids, n=4, max_new_tokens=40, temperature=1.5, images=images)
    banned = set(tok.vision.suppress_ids)
    assert {tok.convert_tokens_to_ids(s) for s in SPECIALS} <= banned and tok.eos_token_id not in banned
    assert sum(len(c) for c in completions) > 200
    assert not banned & {t for c in completions for t in c}


def test_text_model_with_image_problems_is_an_error():
    from credit_ops.trainer.modeling import char_tokenizer

    with pytest.raises(ValueError, match="vision-language model"):
        prompt_inputs(char_tokenizer(), _problems((2,)))


# ---- the digit task
def test_rendering_is_deterministic_and_digits_differ():
    a = render_digits([1, 8, 0], torch.Generator().manual_seed(5))
    b = render_digits([1, 8, 0], torch.Generator().manual_seed(5))
    assert a.size == (48, 16) and a.tobytes() == b.tobytes()
    gen = torch.Generator().manual_seed(0)
    cells = {d: render_digits([d], gen).convert("L").tobytes() for d in range(10)}
    assert len(set(cells.values())) == 10
    assert NEIGHBOURS[8] == [0, 6, 9] and NEIGHBOURS[1] == [7]


def test_digit_problems_and_noisy_demonstrations():
    task = DigitTask(3, "+-", slip_prob=0.3, read_slip_prob=0.3)
    gen = torch.Generator().manual_seed(0)
    probs = task.sample(200, gen)
    for p in probs[:20]:
        d = p.meta["digits"]
        assert set(p.prompt) <= set("ABC+-=") and not any(c.isdigit() for c in p.prompt)  # values only in the image
        assert p.steps[0] == f"A={d[0]}" and p.steps[1] == f"B={d[1]}" and p.steps[3] == f"C={d[2]}"
        assert task.score(p, p.solution) == 1.0 and int(p.answer) >= 0
    demos = [(p, task.demonstration(p, gen)) for p in probs]
    wrong = [(p, s) for p, s in demos if task.score(p, s) == 0]
    assert 0.3 < len(wrong) / len(demos) < 0.8
    assert any(s.split(";")[0] != p.steps[0] for p, s in demos)  # some first digits misread
    for p, s in wrong:
        steps = s.split(";")
        read = [int(steps[k][2:]) for k in (0, 1, 3)]
        assert all(r == d or r in NEIGHBOURS[d] for r, d in zip(read, p.meta["digits"], strict=True))


def test_oracle_repairs_a_misread_and_a_slip():
    """The first wrong step is a perception step (C=1 for a 4) or a reasoning step (9-4=6); the repair keeps the
    correct steps and rewrites from the first wrong one, so the token edit starts there."""
    from credit_ops.trainer.visual_task import VisualProblem

    p = VisualProblem("A+B-C=", "5", DigitTask.chain([7, 2, 4], ["+", "-"]), ";", {"digits": [7, 2, 4]})
    assert p.solution == "A=7;B=2;7+2=9;C=4;9-4=5;#5"
    misread, slip = "A=7;B=2;7+2=9;C=1;9-1=8;#8", "A=7;B=2;7+2=9;C=4;9-4=6;#6"
    assert oracle_repair(p, misread) == p.solution and oracle_repair(p, slip) == p.solution
    tok = vlm_tokenizer()
    # one token per character: the misread digit and the three tokens it propagated to; the slipped result and
    # the answer after it
    expected = {misread: [16, 20, 22, 25], slip: [22, 25]}
    for text, want in expected.items():
        a = torch.tensor([tok(text)["input_ids"]])
        b = torch.tensor([tok(p.solution)["input_ids"]])
        out = credit_ops.align_edits(a, torch.tensor([a.shape[1]]), b, torch.tensor([b.shape[1]]))
        assert out.mask_a[0].nonzero().flatten().tolist() == want, text
    assert misread[16] == "1" and slip[22] == "6"  # the first edited token is the misread digit / the slipped result


# ---- vjsonl datasets
def test_vjsonl_round_trip_and_bad_images(tmp_path):
    path = write_dataset(DigitTask(2, "+"), 5, str(tmp_path / "data.jsonl"))
    task = VisualJsonlTask(path)
    assert task.checkable and len(task.rows) == 5 and task.rows[0].image.size == (32, 16)
    cfg = _cfg(task__name="vjsonl", task__path=path)
    assert cfg.task.path == path
    rows = [json.loads(line) for line in open(path)]

    def write(rows):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write([*rows[:2], {**rows[2], "image": "images/nope.png"}])
    with pytest.raises(ConfigError, match=r"row 3: image 'images/nope.png' not found"):
        _cfg(task__name="vjsonl", task__path=path)
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    write([{**rows[0], "image": "images/bad.png"}])
    with pytest.raises(ConfigError, match="row 1: image .*bad.png cannot be read"):
        _cfg(task__name="vjsonl", task__path=path)
    write([{k: v for k, v in rows[0].items() if k != "image"}])
    with pytest.raises(ConfigError, match="missing field 'image'"):
        VisualJsonlTask(path)


def test_config_errors_before_training():
    with pytest.raises(ConfigError, match="needs a vision-language model"):
        load_config(task__name="visual")  # the text tiny model
    with pytest.raises(ConfigError, match="freeze_vision needs a vision-language model"):
        load_config(model__freeze_vision=True)
    with pytest.raises(ConfigError, match="multiple of 6"):
        _cfg(model__d_model=64)
    with pytest.raises(ConfigError, match="too short for visual solutions"):
        _cfg(rollout__max_new_tokens=20)


# ---- training
# One warm start for every training test (cached by its config, like the trainer's): clean demonstrations, long
# enough that the model reads most digits (the reading appears after ~300-500 steps; 2-3 min on 1 thread), so
# groups hold correct and wrong samples and the shuffled-image control has something to lose.
WARM = dict(
    warm_start__steps=WARM_STEPS,
    warm_start__batch_size=32,
    warm_start__lr=5e-3,
    task__slip_prob=0.0,
    task__read_slip_prob=0.0,
    warm_start__revision_batch_size=0,  # the policy-reviser test shares this warm start too
)


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("vlm_warm"))


def _train(tmp_path, name, cache, **kw):
    from credit_ops.trainer.train import train

    base = dict(
        name=name,
        out_dir=str(tmp_path),
        algo="diff_feedback",
        revise__reviser="oracle",
        steps=2,
        **WARM,
        warm_start__cache_dir=cache,
        rollout__prompts_per_step=4,
        rollout__group_size=4,
        eval_prompts=8,
        eval_every=0,
        log_samples_every=1,
    )
    cfg = _cfg(**{**base, **kw})
    summary = train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "metrics.jsonl"))]
    return cfg, summary, rows


@pytest.mark.slow  # the shared warm start, when it runs first
@pytest.mark.parametrize("granularity", ["token", "step"])
def test_diff_feedback_steps(tmp_path, warm_cache, granularity):
    cfg, summary, rows = _train(tmp_path, f"df_{granularity}", warm_cache, credit__granularity=granularity,
                                loss__fused=True, optim__micro_batch_size=5)  # fmt: skip
    assert len(rows) == 2 and summary["steps"] == 2
    for r in rows:
        for k in ("repair_success", "active_tokens", "phi", "edit_distance", "ratio_mean", "grad_norm"):
            assert k in r and math.isfinite(r[k]), k
        assert r["repair_rows"] > 0 and r["grad_norm"] > 0 and r["step_skipped"] == 0
    assert 0 <= summary["eval_shuffled_accuracy"] <= 1
    views = [json.loads(line) for line in open(os.path.join(cfg.run_dir, "samples.jsonl"))]
    assert views[0]["image"].startswith("data:image/png;base64,")
    assert [f for f in os.listdir(warm_cache) if f.startswith("vlm_warm_")]  # cached, for the next tests


@pytest.mark.slow  # the shared warm start, when it runs first
def test_policy_reviser_sees_the_image_and_vision_frozen(tmp_path, warm_cache, monkeypatch):
    import credit_ops.trainer.revise as revise

    seen = []
    real = revise.generate

    def spy(model, tokenizer, prompts, **kw):
        seen.append(kw.get("images"))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(revise, "generate", spy)
    before = {}

    def snapshot(model):
        before.update({n: p.detach().clone() for n, p in model.named_parameters()})

    import credit_ops.trainer.vision as vision

    build = vision.build_vlm

    def build_and_snapshot(cfg, task, log=print):
        model, tok = build(cfg, task, log)
        snapshot(model)
        return model, tok

    import credit_ops.trainer.train as train_mod

    monkeypatch.setattr(train_mod, "build_vlm", build_and_snapshot)
    cfg, _, rows = _train(tmp_path, "policy", warm_cache, revise__reviser="policy", model__freeze_vision=True, steps=1)
    assert seen and all(imgs is not None for imgs in seen)
    from safetensors.torch import load_file  # the checkpoint holds the trained weights

    ck = os.path.join(cfg.run_dir, "checkpoints", "step_1", "model.safetensors")
    after = load_file(ck)
    vis = [n for n in before if ".visual." in f".{n}"]
    txt = [n for n in before if ".visual." not in f".{n}" and n in after]
    assert vis and all(torch.equal(before[n], after[n]) for n in vis if n in after)
    assert any(not torch.equal(before[n], after[n]) for n in txt)


def test_warm_start_teaches_revisions_with_the_image(tmp_path, monkeypatch):
    """With revise.reviser=policy the warm start adds revision examples: revision prompts with their problem's
    image (counted here), the oracle's repair as the target; it gets its own cache entry."""
    import credit_ops.trainer.vision as vision

    cfg = _cfg(algo="diff_feedback", revise__reviser="policy", warm_start__steps=2, warm_start__batch_size=4,
               warm_start__revision_batch_size=3, warm_start__cache_dir=str(tmp_path))  # fmt: skip
    seen = []
    real = vision.sft_batch

    def spy(tok, problems, completions, texts=None):
        batch = real(tok, problems, completions, texts)
        seen.append((texts, batch["image_grid_thw"].shape[0], completions, problems))
        return batch

    monkeypatch.setattr(vision, "sft_batch", spy)
    task = DigitTask(3, "+-")
    vision.build_vlm(cfg, task, log=lambda s: None)
    revisions = [x for x in seen if x[0] is not None]
    assert len(revisions) == 2 and all(n == 3 and "attempt" in t[0] for t, n, _, _ in revisions)
    # the target: the oracle's minimal repair of the wrong attempt, i.e. the reference solution
    assert all(c == p.solution for _, _, cs, ps in revisions for c, p in zip(cs, ps, strict=True))
    assert os.listdir(tmp_path)[0].startswith("vlm_warm_")


def test_repairs_reuse_their_samples_image(vlm):
    from credit_ops.trainer.credit import Credit
    from credit_ops.trainer.revise import Repair
    from credit_ops.trainer.train import training_rows

    _, tok = vlm
    probs = _problems((3, 2))
    ids, images = prompt_inputs(tok, probs)
    comp = [tok("A=1;#1")["input_ids"] + [tok.eos_token_id]] * 4
    samples = Samples([ids[0], ids[0], ids[1], ids[1]], comp, ["A=1;#1"] * 4, torch.tensor([0, 0, 1, 1]), 0,
                      images=[images[0], images[0], images[1], images[1]])  # fmt: skip
    repairs = [Repair(2, comp[0], "A=1;#1", 1.0, 3), Repair(0, comp[0], "A=1;#1", 1.0, 3)]
    credit = Credit(torch.zeros(6, 8), None, [1, 0])
    batch, _, _ = training_rows(samples, repairs, credit, tok.pad_token_id, "cpu")
    assert batch.image_grid_thw.tolist()[4:] == [images[0].grid_thw.tolist(), images[1].grid_thw.tolist()]
    assert torch.equal(batch.input_ids[4], batch.input_ids[0]) and torch.equal(batch.input_ids[5], batch.input_ids[2])


# ---- the image matters: a warm-started model is at chance with shuffled images
def _greedy_accuracy(model, tok, task, probs, images):
    ids, _ = prompt_inputs(tok, probs)
    _, texts = generate(model, tok, ids, n=1, max_new_tokens=40, temperature=1.0, do_sample=False, images=images)
    return sum(task.score(p, t) for p, t in zip(probs, texts, strict=True)) / len(probs)


@pytest.mark.slow  # the shared warm start, when it runs first
def test_shuffled_images_fall_to_chance(warm_cache):
    from credit_ops.trainer.vision import build_vlm
    from credit_ops.trainer.visual_task import build_visual_task

    torch.set_num_threads(1)
    cfg = _cfg(**WARM, warm_start__cache_dir=warm_cache)
    task = build_visual_task(cfg)
    model, tok = build_vlm(cfg, task, log=lambda s: None)
    model.eval()
    probs = task.sample(128, torch.Generator().manual_seed(7), split="eval")
    _, images = prompt_inputs(tok, probs)
    acc = _greedy_accuracy(model, tok, task, probs, images)
    shuffled = _greedy_accuracy(model, tok, task, probs, images[1:] + images[:1])  # each prompt, the next image
    # chance: the best image-blind guess, the most common answer for the prompt's operations
    pool = task.sample(4000, torch.Generator().manual_seed(8))
    by_prompt = {}
    for p in pool:
        by_prompt.setdefault(p.prompt, []).append(p.answer)
    blind = sum(max(map(a.count, set(a))) for a in by_prompt.values()) / len(pool)
    assert acc >= 2 * max(shuffled, blind), (acc, shuffled, blind)
    assert shuffled <= blind + 0.08, (acc, shuffled, blind)


# ---- a local checkpoint directory: the real-model path (AutoModelForImageTextToText, its chat template)
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}:{% endif %}"
)


def test_local_checkpoint_loads_through_the_auto_classes(vlm, tmp_path):
    from credit_ops.trainer.vision import is_vlm_dir, load_vlm

    model, tok = vlm
    d = str(tmp_path / "ckpt")
    model.save_pretrained(d)
    saved = vlm_tokenizer()
    saved.chat_template = CHAT_TEMPLATE
    saved.save_pretrained(d)
    tiny_image_processor().save_pretrained(d)
    assert is_vlm_dir(d) and not is_vlm_dir(str(tmp_path))
    loaded, ltok = load_vlm(d)
    probs = _problems((3, 2))
    ids, images = prompt_inputs(ltok, probs)
    vp = ltok.vision
    assert ids[0][:5] == [vp.vision_start_id] + [vp.image_token_id] * 3 + [vp.vision_end_id]  # the template's
    assert ltok.decode(ids[1], skip_special_tokens=True) == probs[1].prompt + ":"
    batch = pack(ids, [[ltok.eos_token_id]] * 2, ltok.pad_token_id, "cpu", images=images)
    ref = pack(ids, [[ltok.eos_token_id]] * 2, ltok.pad_token_id, "cpu", images=prompt_inputs(tok, probs)[1])
    assert torch.allclose(sequence_logprobs(loaded.eval(), batch), sequence_logprobs(model, ref), atol=1e-6)
    cfg = _cfg(model__path=d, model__freeze_vision=True)  # a VLM directory passes the visual task's checks
    assert cfg.model.path == d
