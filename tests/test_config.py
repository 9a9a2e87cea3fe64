from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.generate.top_k == 20


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_say_how_to_run(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# make ") and path.name in first


def test_overrides_apply_with_yaml_types():
    cfg = load_config(None, ["filter.min_steps=3", "generate.temperature=0",
                             "eval.systems=[teacher,base]"])
    assert cfg.filter.min_steps == 3
    assert cfg.generate.temperature == 0.0
    assert cfg.eval.systems == ["teacher", "base"]
    with pytest.raises(ConfigError, match="must be numbers for the demo task"):
        load_config(None, ["task.n_train=null"])
    # YAML 1.1 reads 3e-3 as a string: a float setting takes it as the number it is
    assert load_config(None, ["train.learning_rate=3e-3"]).train.learning_rate == 0.003
    with pytest.raises(ConfigError, match="expected float"):
        load_config(None, ["train.learning_rate=fast"])
    # a mapping's fields one by one, or the whole mapping
    cfg = load_config(None, ["train.args.optim=adafactor", "train.args.max_grad_norm=0.5"])
    assert cfg.train.args == {"optim": "adafactor", "max_grad_norm": 0.5}
    assert load_config(None, ["train.args={warmup_steps: 3}"]).train.args == {"warmup_steps": 3}
    with pytest.raises(ConfigError, match="section.key.field for a mapping"):
        load_config(None, ["train.seed.x=1"])


def test_unknown_keys_suggest_and_all_errors_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generate:\n  temprature: 0.5\n  top_p: 1.5\nfilter:\n  min_step: 2\n"
                    "trian:\n  alpha: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.alpha=1.5", "eval.systems=[teacher,bse]"])
    text = str(err.value)
    assert "did you mean 'temperature'" in text
    assert "did you mean 'min_steps'" in text
    assert "did you mean 'train'" in text
    assert "generate.top_p: 1.5 is out of range" in text
    assert "train.alpha: 1.5 is out of range" in text
    assert "did you mean 'base'" in text
    assert len(err.value.errors) == 6


def test_type_errors_and_bad_override_syntax():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["generate.n_samples=two", "nodot=3", "generate.backend=vlm"])
    text = str(err.value)
    assert "generate.n_samples: expected int, got 'two'" in text
    assert "section.key" in text
    assert "generate.backend: 'vlm' is not allowed; did you mean 'vllm'?" in text


def test_missing_file_says_where_configs_are():
    with pytest.raises(ConfigError, match="configs/"):
        load_config("configs/nope.yaml")


def test_a_binary_config_file_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "not UTF-8 text" in text and "configs/demo.yaml" in text


def test_a_config_copies_and_pickles_with_the_backends_settings_joined():
    """The generate section is a class joined at run time from the stage's settings and the
    backends' (`BackendKind.settings`): copies (Ray ships configs to workers) rebuild it."""
    import copy
    import pickle

    cfg = load_config("configs/demo.yaml", ["generate.backend=openai",
                                            "generate.base_url=http://127.0.0.1:1/v1"])
    for again in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert again == cfg and type(again.generate) is type(cfg.generate)
        assert again.generate.base_url == "http://127.0.0.1:1/v1"
    assert cfg.replace(train=cfg.train).generate is cfg.generate


def test_a_backend_setting_that_would_change_other_backends_fingerprints_is_refused():
    from dataclasses import dataclass

    from pipeline.config import IF_READ, opt
    from stages.backends.base import BackendKind

    @dataclass
    class Loose:
        depth: int = opt(1, "Decides what every backend makes.")  # fingerprint=ALWAYS

    with pytest.raises(TypeError, match=r"its settings \['depth'\] must be declared"):
        BackendKind("loose", lambda cfg, cache, seed: None, settings=Loose)

    @dataclass
    class Own:
        depth: int = opt(1, "Decides what this backend makes.", fingerprint=IF_READ)

    assert "depth" in BackendKind("own", lambda cfg, cache, seed: None, settings=Own).reads
