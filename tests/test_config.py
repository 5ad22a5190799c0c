import dataclasses

import pytest
import yaml

from samsr import config as c


def test_every_preset_loads_and_is_frozen():
    names = c.presets()
    assert {"samdiffsr", "samdiffsr-tiny", "samsr-teacher", "samsr-teacher-tiny",
            "samsr-student", "samsr-student-tiny"} <= set(names)
    for name in names:
        cfg = c.load(name)
        assert cfg.data.hr_crop % cfg.data.scale == 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.train.lr = 1.0  # type: ignore[misc]


def test_paper_values_of_samdiffsr_preset():
    cfg = c.load("samdiffsr")
    assert (cfg.data.hr_crop, cfg.train.batch_size, cfg.train.lr) == (160, 64, 2e-4)
    assert (cfg.train.iterations, cfg.train.lr_decay_every, cfg.train.lr_decay_gamma) == (400_000, 200_000, 0.5)
    assert (cfg.rrdb.num_feat, cfg.rrdb.num_block, cfg.unet.base, cfg.unet.mults) == (64, 17, 64, (1, 2, 3, 4))
    assert (cfg.samdiffsr.timesteps, cfg.samdiffsr.cosine_s, cfg.train.grad_clip) == (100, 0.008, 10.0)


def test_overrides_are_typed():
    cfg = c.load("samdiffsr-tiny", ["train.lr=1e-4", "unet.mults=[1,2,4]", "segmenter.kind=superpixel",
                                    "train.iterations=7", "data.flips=false"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.unet.mults == (1, 2, 4)
    assert cfg.segmenter.kind == "superpixel"
    assert cfg.train.iterations == 7 and cfg.data.flips is False


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("bogus=1", "bogus"),
    ("unet.base.x=1", "unet.base"),
])
def test_unknown_keys_are_rejected_by_name(override, key):
    with pytest.raises(c.ConfigError, match=key.replace(".", r"\.")):
        c.load("samdiffsr-tiny", [override])


@pytest.mark.parametrize("override, message", [
    ("train.iterations=1.5", "train.iterations: expected an integer"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("data.flips=3", "data.flips: expected true/false"),
    ("method=srgan", "method: 'srgan' is not one of"),
    ("segmenter.kind=magic", "segmenter.kind: 'magic'"),
    ("data.hr_crop=65", "multiple of data.scale"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(c.ConfigError, match=message):
        c.load("samdiffsr-tiny", [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: samdiffsr\ntrain: {batch_size: 4, learning_rate: 0.1}\n")
    with pytest.raises(c.ConfigError, match="'train.learning_rate'"):
        c.load(path)


def test_missing_file_and_unknown_preset():
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load("nowhere/config.yaml")
    with pytest.raises(c.ConfigError, match="neither a config file nor a preset"):
        c.load("samdiffsr-huge")


def test_round_trip_through_yaml_and_flatten():
    cfg = c.load("samsr-student-tiny", ["resshift.loss_semantic=0.5"])
    again = c.from_dict(yaml.safe_load(c.dump_yaml(cfg)))
    assert again == cfg
    flat = c.flatten(cfg)
    assert flat["resshift.loss_semantic"] == 0.5
    assert flat["unet.mults"] == "1,2"
    assert flat["method"] == "samsr-student"


@pytest.mark.parametrize("overrides, pool", [
    ([], (1, 1)),                                                       # as before: one actor
    (["upscale.actors=4"], (4, 4)),                                     # a fixed pool, as before
    (["upscale.max_actors=8"], (1, 8)),                                 # grows from 1 up to 8
    (["upscale.min_actors=2", "upscale.max_actors=8"], (2, 8)),
    (["upscale.actors=4", "upscale.max_actors=8"], (4, 8)),
    (["upscale.actors=4", "upscale.min_actors=2"], (2, 4)),
])
def test_model_actor_pools(overrides, pool):
    assert c.actor_pool(c.load("samdiffsr-tiny", overrides).upscale) == pool


@pytest.mark.parametrize("overrides, message", [
    (["eval.max_actors=-1"], r"eval\.max_actors=-1 must be >= 0"),
    (["upscale.min_actors=-2"], r"upscale\.min_actors=-2 must be >= 0"),
    (["upscale.min_actors=5", "upscale.max_actors=3"], r"upscale\.min_actors=5 is above upscale\.max_actors=3"),
    (["eval.actors=8", "eval.max_actors=4"], r"eval\.actors=8 is above eval\.max_actors=4"),
    (["upscale.max_actors=two"], r"upscale\.max_actors: expected an integer"),
])
def test_bad_actor_pools_are_refused_by_name(overrides, message):
    with pytest.raises(c.ConfigError, match=message):
        c.load("samdiffsr-tiny", overrides)
