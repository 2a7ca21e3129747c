"""Config system: _base_ inheritance, -o overrides, validation messages, dump round trip."""
import os
import textwrap

import pytest
import yaml

from passl.config import apply_overrides, dump_config, load_config
from passl.errors import ConfigError
from passl.registry import MODELS, TRANSFORMS

if "_cfgtest_model" not in MODELS:
    @MODELS.register("_cfgtest_model")
    def _cfgtest_model(dim=32, depth=2, drop_path_rate=0.1, use_bn=True, stem="patch16", num_classes=10):
        return None

    @TRANSFORMS.register("_cfgtest_flip")
    def _cfgtest_flip(prob=0.5):
        return None

    @TRANSFORMS.register("_cfgtest_crop")
    def _cfgtest_crop(size=32, scale=(0.08, 1.0)):
        return None


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def base_cfg(tmp_path):
    write(tmp_path, "common/root.yaml", """
        seed: 7
        epochs: 10
        model: {name: _cfgtest_model, dim: 32, depth: 2}
        data:
          train:
            transforms:
              - {name: _cfgtest_flip, prob: 0.5}
              - {name: _cfgtest_crop, size: 32}
            batch_size: 8
        """)
    write(tmp_path, "common/mid.yaml", """
        _base_: root.yaml
        epochs: 20
        model: {depth: 4}
        """)
    return write(tmp_path, "child.yaml", """
        _base_: common/mid.yaml
        model: {drop_path_rate: 0.2}
        """)


def test_base_inheritance_is_recursive_and_relative(base_cfg):
    cfg = load_config(base_cfg)
    assert cfg["seed"] == 7                      # from the grandparent
    assert cfg["epochs"] == 20                   # parent overrides grandparent
    assert cfg["model"] == {"name": "_cfgtest_model", "dim": 32, "depth": 4, "drop_path_rate": 0.2}
    assert cfg["data"]["train"]["batch_size"] == 8
    assert cfg["data"]["val"]["batch_size"] == 128   # default filled in
    assert cfg["ema"]["decay"] == pytest.approx(0.99992)


def test_a_new_name_replaces_the_section_whole(tmp_path, base_cfg):
    child = write(tmp_path, "other.yaml", """
        _base_: child.yaml
        model: {name: _cfgtest_model}
        optimizer: {name: AdamW}
        """)
    assert load_config(child)["model"]["depth"] == 4   # same name: merged
    renamed = write(tmp_path, "renamed.yaml", "_base_: child.yaml\nmodel: {name: LVViT}\n")
    assert load_config(renamed)["model"] == {"name": "LVViT"}


def test_override_values_are_parsed_as_yaml(base_cfg):
    cfg = load_config(base_cfg, [
        "epochs=3",
        "optimizer.lr=1e-3",
        "data.train.transforms.1.scale=[0.5,1]",
        "output_dir=run=a=b",
        "model.use_bn=false",
        "data.train.transforms.0.prob=0.3",
        "train.grad_clip=null",
    ])
    assert cfg["epochs"] == 3 and isinstance(cfg["epochs"], int)
    assert cfg["optimizer"]["lr"] == 1e-3 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["data"]["train"]["transforms"][1]["scale"] == [0.5, 1]
    assert cfg["output_dir"] == "run=a=b"
    assert cfg["model"]["use_bn"] is False
    assert cfg["data"]["train"]["transforms"][0] == {"name": "_cfgtest_flip", "prob": 0.3}
    assert cfg["train"]["grad_clip"] is None


def test_override_is_never_evaluated(base_cfg):
    cfg = load_config(base_cfg, ["output_dir=__import__('os').getcwd()"])
    assert cfg["output_dir"] == "__import__('os').getcwd()"


def test_int_is_widened_where_a_float_belongs(base_cfg):
    cfg = load_config(base_cfg, ["model.drop_path_rate=0", "ema.decay=1"])
    assert cfg["model"]["drop_path_rate"] == 0.0 and isinstance(cfg["model"]["drop_path_rate"], float)
    assert isinstance(cfg["ema"]["decay"], float)


def test_list_index_out_of_range_is_named(base_cfg):
    with pytest.raises(ConfigError, match="data.train.transforms.5.*2 items"):
        load_config(base_cfg, ["data.train.transforms.5.prob=0.3"])


def test_override_without_equals_sign(base_cfg):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(base_cfg, ["epochs"])


@pytest.mark.parametrize("override, fragments", [
    ("epohcs=3", ["unknown key 'epohcs'", "-o epohcs=3", "Did you mean: epochs"]),
    ("model.dpeth=3", ["unknown key 'model.dpeth'", "Did you mean: depth"]),
    ("ema.decy=0.9", ["unknown key 'ema.decy'", "Did you mean: decay"]),
    ("data.train.batchsize=4", ["data.train.batchsize", "Did you mean: batch_size"]),
    ("model.name=_cfgtest_modle", ["model.name", "Did you mean: _cfgtest_model"]),
])
def test_unknown_override_key_names_it_and_the_nearest(base_cfg, override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(base_cfg, [override])
    for fragment in fragments:
        assert fragment in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path, base_cfg):
    bad = write(tmp_path, "bad.yaml", "_base_: child.yaml\ntrain: {log_intervall: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "train.log_intervall" in msg and bad in msg and "Did you mean: log_interval" in msg


def test_unknown_key_in_a_base_file_names_the_base(tmp_path):
    base = write(tmp_path, "b.yaml", "model: {name: _cfgtest_model}\nseeed: 1\n")
    child = write(tmp_path, "c.yaml", "_base_: b.yaml\nepochs: 1\n")
    with pytest.raises(ConfigError, match=f"unknown key 'seeed' in {base}.*Did you mean: seed"):
        load_config(child)


@pytest.mark.parametrize("override, fragments", [
    ("epochs=oops", ["epochs", "expected an integer", "'oops'"]),
    ("epochs=2.5", ["epochs", "expected an integer"]),
    ("ema.decay=high", ["ema.decay", "expected a number"]),
    ("model.use_bn=maybe", ["model.use_bn", "true or false"]),
    ("device=tpu", ["device", "auto, cpu, gpu"]),
    ("data.train.transforms=flip", ["data.train.transforms", "expected a list"]),
])
def test_wrong_type_is_an_error(base_cfg, override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(base_cfg, [override])
    for fragment in fragments:
        assert fragment in str(e.value)


def test_missing_base_and_cycles_are_reported(tmp_path):
    missing = write(tmp_path, "m.yaml", "_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="_base_ file 'nowhere.yaml' not found"):
        load_config(missing)
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    b = write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(b)
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "absent.yaml"))
    not_a_map = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(not_a_map)


def test_dump_round_trip(tmp_path, base_cfg):
    cfg = load_config(base_cfg, ["optimizer.lr=1e-3", "train.grad_clip=5"])
    out = str(tmp_path / "run" / "config.yaml")
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert "_base_" not in yaml.safe_load(open(out))
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_apply_overrides_leaves_its_input_alone():
    original = {"a": {"b": [1, 2]}}
    changed = apply_overrides(original, ["a.b.0=5"])
    assert changed == {"a": {"b": [5, 2]}} and original == {"a": {"b": [1, 2]}}


def test_model_sync_bn_is_a_model_key_the_builder_drops(tmp_path):
    import passl
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: LVViT, img_size: 32, embed_dim: 32, depth: 1, num_heads: 2, num_classes: 3}\n")
    assert "sync_bn" not in load_config(str(path))["model"]
    cfg = load_config(str(path), ["model.sync_bn=true"])
    assert cfg["model"]["sync_bn"] is True
    assert passl.build_model(cfg["model"]).num_classes == 3
    with pytest.raises(ConfigError, match="model.sync_bn: expected true or false, got 'yes please'"):
        load_config(str(path), ["model.sync_bn=yes please"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.sync_b'.*Did you mean: sync_bn"):
        load_config(str(path), ["model.sync_b=true"])
