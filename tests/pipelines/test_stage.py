import pytest
from pydantic import Field

from pipelines.errors import ConfigError
from pipelines.stage import StageConfig, load_config, parse_overrides


class _Cfg(StageConfig):
    name: str
    size: int = Field(3, gt=0)
    tags: list[str] = Field(default_factory=list)


def test_overrides_parse_yaml_values_and_nest():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=x", "e="]) == {
        "a": {"b": 3},
        "c": [1, 2],
        "d": "x",
        "e": "",
    }


def test_yaml_then_values_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: from-yaml\nsize: 5\n")
    cfg = load_config(_Cfg, p, ["size=7"], tags=["t"])
    assert (cfg.name, cfg.size, cfg.tags) == ("from-yaml", 7, ["t"])


def test_bad_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"size: Input should be greater than 0"):
        load_config(_Cfg, None, ["size=0"], name="x")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(_Cfg, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_Cfg, tmp_path / "bad.yaml")
