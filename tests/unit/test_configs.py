"""Every YAML under ``configs/`` parses through the real ``align fit`` parser, and means what it says.

Parse only (``alignment.commands.fit.parse_config``): no hub model is loaded. The
dataclass value checks (``__post_init__``) are then run by building the typed
configs from the parsed values, and DeepSpeed strategies are constructed from
their ``init_args`` (construction does not touch a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from alignment.commands.fit import parse_config
from alignment.data.datamodule import DataConfig
from alignment.losses import LossConfig
from alignment.model import ModelConfig
from alignment.optim import OptimConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p for p in (CONFIGS / "recipes").glob("*.yaml") if not p.name.startswith("_"))
DEEPSPEED = sorted((CONFIGS / "deepspeed").glob("*.yaml"))
OPTIONS = sorted((CONFIGS / "options").glob("*.yaml"))  # fragments composed after a recipe
TOP_LEVEL = sorted(CONFIGS.glob("*.yaml"))  # debug.yaml, demo.yaml (the lead's) when present

HUB = {
    "xlm-roberta-base": ("xlm-roberta-base", "mean", ""),
    "bert-base-multilingual-cased": ("bert-base-multilingual-cased", "mean", ""),
    "labse": ("sentence-transformers/LaBSE", "cls", ""),
    "multilingual-e5-base": ("intfloat/multilingual-e5-base", "mean", "query: "),
}
KINDS = {"multiway": ("all", "multi_positive"), "enx": ("pivot_pair", "en_x")}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI compares its args with sys.argv; pytest's own flags are not ours.
    monkeypatch.setattr(sys, "argv", ["align"])


def _typed(config):
    """Build the typed dataclasses from a parsed config: runs every ``__post_init__`` check."""
    model = config.model.as_dict()
    return (
        ModelConfig(**model["encoder"]),
        LossConfig(**model["loss"]),
        OptimConfig(**model["optim"]),
        DataConfig(**config.data.as_dict()),
    )


def test_the_expected_files_exist():
    names = {p.stem for p in RECIPES}
    assert names == {f"{m}-{k}" for m in HUB for k in KINDS}
    assert {p.stem for p in DEEPSPEED} == {"zero1", "zero2", "zero3", "zero3-offload"}


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_top_level_configs_parse(path):
    config = parse_config(["--config", str(path)])
    _typed(config)
    assert config.trainer.max_steps > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_matches_its_name(path):
    model_key, kind = path.stem.rsplit("-", 1)
    hub, pooling, prefix = HUB[model_key]
    policy, objective = KINDS[kind]
    config = parse_config(["--config", str(path)])
    encoder, loss, optim, data = _typed(config)

    assert (encoder.name_or_path, encoder.pooling, encoder.random_init) == (hub, pooling, False)
    assert data.tokenizer == hub and data.text_prefix == prefix
    assert (data.language_policy, loss.objective) == (policy, objective)
    assert optim.lr == pytest.approx(2e-5) and 0 < optim.warmup_steps < config.trainer.max_steps
    trainer = config.trainer
    assert (trainer.accelerator, trainer.precision) == ("gpu", "bf16-mixed")
    assert trainer.strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert 0 < trainer.val_check_interval < trainer.max_steps and trainer.check_val_every_n_epoch is None
    assert config.checkpoint.every_n_train_steps > 0 and config.checkpoint.save_last


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.stem)
def test_deepspeed_config_composes_after_a_recipe(path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    recipe = CONFIGS / "recipes" / "xlm-roberta-base-multiway.yaml"
    config = parse_config(["--config", str(recipe), "--config", str(path)])
    strategy = config.trainer.strategy
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    args = strategy["init_args"].as_dict()
    expected_stage = 3 if path.stem.startswith("zero3") else int(path.stem[-1])
    assert args["stage"] == expected_stage
    assert args["offload_optimizer"] == args["offload_parameters"] == path.stem.endswith("offload")
    # the rest of the recipe survives the composition
    assert config.trainer.precision == "bf16-mixed" and config.model.encoder.name_or_path == "xlm-roberta-base"
    built = DeepSpeedStrategy(**args)
    assert built.config["zero_optimization"]["stage"] == expected_stage


@pytest.mark.parametrize("path", OPTIONS, ids=lambda p: p.stem)
def test_option_fragment_composes_after_a_recipe(path):
    import yaml

    recipe = CONFIGS / "recipes" / "labse-multiway.yaml"
    config = parse_config(["--config", str(recipe), "--config", str(path)])
    _typed(config)
    fragment = yaml.safe_load(path.read_text())
    for section, values in fragment.items():  # the fragment's values are the ones in force
        for group, settings in values.items():
            for key, value in (settings.items() if isinstance(settings, dict) else [(None, settings)]):
                parsed = config[section][group] if key is None else config[section][group][key]
                assert parsed == value, (section, group, key)
    assert config.model.encoder.name_or_path == "sentence-transformers/LaBSE"  # the recipe survives


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("model:\n  optim:\n    lrr: 1.0\n", "optim.lrr"),
        ("trainer:\n  max_steps: many\n", "trainer.max_steps"),
        ("data:\n  batch_size: [1, 2]\n", "data.batch_size"),
    ],
    ids=["unknown-key", "wrong-type", "wrong-type-nested"],
)
def test_bad_config_is_rejected_with_the_key_named(tmp_path, capsys, yaml_text, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", str(CONFIGS / "debug.yaml"), "--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = err[err.index("error:"):]
    assert named in message, message


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--config", str(CONFIGS / "debug.yaml"), "--model.optim.learning_rate", "1"])
    assert "model.optim.learning_rate" in capsys.readouterr().err


def test_value_checks_name_the_flag():
    config = parse_config(["--config", str(CONFIGS / "debug.yaml"), "--model.optim.lr", "-1"])
    with pytest.raises(ValueError, match="--model.optim.lr must be > 0"):
        _typed(config)


OBJECTIVES = sorted((CONFIGS / "recipes" / "objectives").glob("*.yaml"))


@pytest.mark.parametrize("path", OBJECTIVES, ids=lambda p: p.stem)
def test_objective_overlay_composes_after_a_recipe(path):
    """``configs/recipes/objectives/*.yaml`` (alignment/objectives/): each overlay turns its own term on."""
    from alignment.objectives import AdversarialConfig, DistillConfig, MatryoshkaConfig, NeighbourhoodConfig

    recipe = CONFIGS / "recipes" / "multilingual-e5-base-multiway.yaml"
    config = parse_config(["--config", str(recipe), "--config", str(path)])
    _typed(config)
    model = config.model.as_dict()
    built = {"adversarial": AdversarialConfig(**model["adversarial"]), "distill": DistillConfig(**model["distill"]),
             "neighbourhood": NeighbourhoodConfig(**model["neighbourhood"]),
             "matryoshka": MatryoshkaConfig(**model["matryoshka"])}
    assert [name for name, cfg in built.items() if cfg.enabled] == [path.stem.partition("-")[0]]  # distill-stored
    assert config.model.encoder.name_or_path == "intfloat/multilingual-e5-base"  # the recipe survives


ADAPTERS = sorted((CONFIGS / "recipes" / "adapters").glob("*.yaml"))


@pytest.mark.parametrize("path", ADAPTERS, ids=lambda p: p.stem)
def test_adapter_overlay_composes_after_a_recipe(path):
    """``configs/recipes/adapters/*.yaml`` (alignment/adapters.py): LoRA, language adapters."""
    recipe = CONFIGS / "recipes" / "xlm-roberta-base-multiway.yaml"
    config = parse_config(["--config", str(recipe), "--config", str(path)])
    encoder, _, optim, _ = _typed(config)
    assert encoder.adapter.method == "lora" and encoder.adapter.target_modules == ["query", "key", "value", "dense"]
    assert encoder.name_or_path == "xlm-roberta-base" and optim.lr == pytest.approx(5e-4)
    if path.stem == "language-adapters":
        assert encoder.adapter.language_groups["de"] == "germanic"
