"""attributes_restored: every object patched for a with-block is left exactly as it was."""
import pytest
import torch

from dreamartist.attributes import attributes_restored


class Engine:
    mode = "class"

    def encode(self):
        return "class method"


def test_an_own_value_is_set_back_and_a_class_value_shows_through_again():
    engine = Engine()
    engine.emphasis = own = object()
    with attributes_restored([(engine, "emphasis"), (engine, "mode"), (engine, "encode")]):
        engine.emphasis, engine.mode, engine.encode = object(), "patched", lambda: "instance"
        assert (engine.mode, engine.encode()) == ("patched", "instance")
    assert engine.emphasis is own
    assert vars(engine) == {"emphasis": own}  # nothing the block set is left on the instance
    assert (engine.mode, engine.encode()) == ("class", "class method")


def test_an_error_in_the_block_still_restores():
    block = torch.nn.Linear(2, 2)
    before = dict(vars(block))
    with pytest.raises(RuntimeError), attributes_restored([(block, "forward"), (block, "training")]):
        block.forward, block.training = (lambda x: x), False
        raise RuntimeError("stopped")
    assert vars(block) == before
    assert block.training is True and block(torch.ones(1, 2)).shape == (1, 2)


def test_a_target_named_twice_ends_as_it_was_before_the_first():
    engine = Engine()
    engine.mode = "own"
    with attributes_restored([(engine, "mode")]):
        engine.mode = "outer"
        with attributes_restored([(engine, "mode"), (engine, "mode")]):
            engine.mode = "inner"
        assert engine.mode == "outer"
    assert engine.mode == "own"
