import re

import pytest
import yaml

from clipzss.config import Config, ConfigError, flatten, from_dict, load_config, to_dict, to_yaml


def test_defaults_follow_method_choices():
    cfg = Config()
    assert cfg.teacher.model == "ViT-B-16" and cfg.teacher.pretrained == "openai"
    assert cfg.plm.kmeans.scales == (4, 8, 16)
    assert cfg.plm.kmeans.iters == 10 and cfg.plm.kmeans.fuse_threshold == 0.85
    assert cfg.glm.tau == 0.07 and cfg.glm.bank_size == 1024
    assert cfg.optim.warmup_iters == 1500 and cfg.optim.poly_power == 0.9


def test_yaml_delta_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"plm": {"kmeans": {"scales": [8, 16]}}, "optim": {"lr": 1e-4}}))
    cfg = load_config(path, ["optim.lr=3e-4", "glm.weight=0", "data.ratio_range=[0.75, 1.5]"])
    assert cfg.plm.kmeans.scales == (8, 16)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.glm.weight == 0.0 and isinstance(cfg.glm.weight, float)
    assert cfg.data.ratio_range == (0.75, 1.5)
    assert cfg.plm.kmeans.iters == 10  # untouched keys keep their defaults


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plm.kmeans.scale=[4]", "unknown config key 'plm.kmeans.scale'; allowed here: scales, iters"),
        ("glmm.weight=1", "unknown config key 'glmm'"),
        ("optim.max_iters=1.5", "optim.max_iters: expected an integer"),
        ("plm.enabled=yes please", "plm.enabled: expected true or false"),
        ("teacher.dense=cls", "teacher.dense: expected one of 'value', 'tokens'"),
        ("plm.kmeans.scales=[4, x]", "plm.kmeans.scales[1]: expected an integer"),
        ("plm=1", "plm: is a section"),
        ("optim.lr", "is not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student:\n  archh: resnet\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'student\.archh'"):
        load_config(path)


def test_missing_preset_lists_available():
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_preset")


def test_flatten_and_round_trip():
    cfg = load_config(None, ["plm.kmeans.scales=[8]", "run.seed=3"])
    flat = flatten(cfg)
    assert flat["plm.kmeans.scales"] == (8,)
    assert flat["run.seed"] == 3
    assert all(isinstance(k, str) and not isinstance(v, dict) for k, v in flat.items())
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_every_dotted_key_is_settable():
    cfg = Config()
    for key, value in flatten(cfg).items():
        load_config(None, [f"{key}={yaml.safe_dump(list(value) if isinstance(value, tuple) else value).strip()}"])
    assert len(flatten(cfg)) > 40


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=-1", "optim.lr: must be > 0, got -1.0"),
        ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
        ("optim.max_iters=0", "optim.max_iters: must be >= 1, got 0"),
        ("data.root=", "data.root: must not be empty"),
        ("data.flip_prob=1.5", "data.flip_prob: must be in [0, 1]"),
        ("plm.kmeans.scales=[]", "plm.kmeans.scales: must be a non-empty list"),
        ("data.test_stride=600", "data.test_stride: must be <= data.test_window (512)"),
    ],
)
def test_meaningless_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_every_broken_value_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["optim.lr=0", "data.batch_size=-2", "run.log_interval=0"])
    assert all(key in str(caught.value) for key in ("optim.lr", "data.batch_size", "run.log_interval"))


def test_every_rule_names_a_real_key():
    from clipzss.config_rules import RULES

    assert set(RULES) <= set(flatten(Config()))
