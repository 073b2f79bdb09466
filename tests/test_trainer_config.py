"""The trainer's configuration as a user meets it: OmegaConf structured configs with a help line per key,
`credit-train --help` / `--print-config`, overrides with type checks and suggestions, shipped configs by name.
Nothing here trains."""

import dataclasses
import os

import pytest
import yaml
from credit_ops.trainer import config as C
from credit_ops.trainer.__main__ import main
from credit_ops.trainer.config import Config, ConfigError, load_config, to_dict


def leaf_keys():
    return [k for k, f in C.schema() if not dataclasses.is_dataclass(f.type)]


def test_every_field_has_a_one_line_help():
    missing = [k for k, f in C.schema() if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"config fields without help (use opt(default, help) / section(cls, help)): {missing}"
    multi = [k for k, f in C.schema() if "\n" in f.metadata["help"]]
    assert not multi, f"help must be one line: {multi}"


def test_schema_covers_every_dataclass_field():
    keys = dict(C.schema())
    assert len(leaf_keys()) > 60 and "optim.lr" in keys and "model" in keys and "model.path" in keys
    for f in dataclasses.fields(C.OptimConfig):
        assert f"optim.{f.name}" in keys


def test_help_lists_every_key_with_default_and_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key, f in C.schema():
        if dataclasses.is_dataclass(f.type):
            assert f"{key}:  {f.metadata['help']}" in out, key
        else:
            line = next((line for line in out.splitlines() if line.strip().startswith(f"{key}=")), None)
            assert line is not None, key
            assert f.metadata["help"] in line and f"({f.type.__name__})" in line, line
    assert "optim.lr=5e-05  (float)" in out and 'algo="ibpo"' in out and "progress=true" in out
    assert "--print-config" in out and "grpo" in out  # the options and the shipped config names


def test_print_config_is_yaml_that_reads_back(capsys, tmp_path):
    args = ["--config", "grpo", "steps=7", "optim.lr=1e-3", "name=x", "task.ops=+"]
    assert main([*args, "--print-config"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert data["steps"] == 7 and data["algo"] == "grpo" and data["optim"]["lr"] == 1e-3 and data["task"]["ops"] == "+"
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    assert to_dict(load_config(["--config", str(path)])) == to_dict(load_config(args))


def test_overrides_are_typed_by_the_schema():
    cfg = load_config(["steps=7", "--optim.lr=1e-3", "--seed", "3", "progress=false", "name=001", "task.ops=+"])
    assert (cfg.steps, cfg.optim.lr, cfg.seed, cfg.progress, cfg.name) == (7, 1e-3, 3, False, "001")
    assert isinstance(cfg, Config) and isinstance(cfg.optim.lr, float) and cfg.run_dir.endswith("001")
    assert load_config(optim__lr=5e-4, rollout__group_size=4).rollout.group_size == 4
    assert load_config(["name=${algo}_${seed}", "algo=grpo"]).name == "grpo_0"  # OmegaConf interpolation


@pytest.mark.parametrize(
    "args, message",
    [
        (["opim.lr=1"], "unknown config key 'opim.lr'; did you mean 'optim.lr'?"),
        (["stesp=3"], "did you mean 'steps'?"),
        (["rollout.group_sise=3"], "did you mean 'rollout.group_size'?"),
        (["lr=1"], "did you mean 'warm_start.lr' or 'optim.lr'?"),
        (["zzz=1"], "credit-train --help lists every key"),
        (["steps=1.5"], "steps must be an integer, got '1.5'"),
        (["optim.lr=fast"], "optim.lr must be a number, got 'fast'"),
        (["progress=maybe"], "progress must be true or false"),
        (["model=3"], "model is a section"),
        (["--config", "grop"], "did you mean 'grpo'?"),
        (["--config"], "--config needs a file"),
        (["stray"], "cannot parse argument 'stray'"),
        (["name=${nope}"], "cannot resolve"),
    ],
)
def test_errors_name_the_key_and_the_closest_valid_one(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?").replace("$", r"\$")):
        load_config(args)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: grpo\noptim: {lr: 1.0e-3, warmup_step: 3}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.warmup_step'; did you mean 'optim"):
        load_config(["--config", str(bad)])
    bad.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="bad.yaml: steps must be an integer"):
        load_config(["--config", str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(["--config", str(bad)])


def test_shipped_configs_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository: the configs come from the package
    assert {"default", "grpo", "ibpo", "iop", "diff_feedback"} <= set(C.shipped_configs())
    for spelling in ("grpo", "grpo.yaml", "configs/grpo.yaml"):
        assert load_config(["--config", spelling]).algo == "grpo", spelling
    # files merge in order, then the command line
    cfg = load_config(["--config", "grpo", "--config", "diff_feedback_step", "steps=5"])
    assert (cfg.algo, cfg.credit.granularity, cfg.steps) == ("diff_feedback", "step", 5)
    # a file of the same name in the working directory wins over the shipped one
    (tmp_path / "grpo.yaml").write_text("algo: dapo\n")
    assert load_config(["--config", "grpo.yaml"]).algo == "dapo"
    assert main(["--config", "nope"]) == 2 and "shipped configs, by name: default" in capsys.readouterr().err


def test_shipped_configs_are_package_data():
    """setup.py ships trainer/configs/*.yaml and the report template with credit_ops.trainer."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup_py = open(os.path.join(root, "setup.py")).read()
    assert '"credit_ops.trainer": ["configs/*.yaml", "templates/*.html.j2"]' in setup_py
    assert os.path.dirname(C.CONFIG_DIR) == os.path.dirname(os.path.abspath(C.__file__))
    assert os.path.isfile(os.path.join(os.path.dirname(C.__file__), "templates", "report.html.j2"))
