"""TrainConfig: one definition of every parameter, with plain-language validation."""
import pytest

from dreamartist.config import TrainConfig, fields
from dreamartist.errors import InputError


def test_defaults_follow_the_paper():
    config = TrainConfig(name="walle")
    assert (config.pos_len, config.neg_len, config.gamma, config.lr) == (3, 3, "3", 0.0025)
    assert config.batch_size == 1 and config.reconstruction


@pytest.mark.parametrize("changes,message", [
    (dict(name=""), "empty"),
    (dict(name="../evil"), "path"),
    (dict(name="a/b"), "path"),
    (dict(name="walle-neg"), "-neg"),
    (dict(name="x", steps=0), "Steps"),
    (dict(name="x", steps=-5), "Steps"),
    (dict(name="x", steps=2.5), "whole number"),
    (dict(name="x", gamma="1-2:exp"), "Gamma"),
    (dict(name="x", width=500), "multiples of 8"),
    (dict(name="x", lr=float("nan")), "finite"),
    (dict(name="x", file_format="ckpt"), "one of"),
    (dict(name="x", reconstruction="yes"), "true or false"),
    (dict(name="x", seed=2**64), "Seed must be between -1 and 4294967295"),
])
def test_bad_values_are_clear_errors(changes, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**changes)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(InputError, match="Unknown option"):
        TrainConfig.from_dict({"name": "x", "stepz": 3})


def test_every_field_has_a_label():
    assert all(f.metadata["label"] for f in fields())
