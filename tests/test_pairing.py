"""Automatic pairing of NAME with NAME-neg on the negative side (paper sec. 4.1, 6.7), decided by tokens as the
webui decides which embeddings a prompt uses, with the real CLIP tokenizer."""
import pytest

from dreamartist.pairing import add_partners, partner_text
from dreamartist.standalone import clip_tokenizer

PAIRS = {"walle": "walle-neg", "cat toy": "cat toy-neg", "sty-cyber": "sty-cyber-neg"}


@pytest.fixture(scope="module")
def pair():
    tokenizer = clip_tokenizer()

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, truncation=False).input_ids

    ids = dict(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, comma=tokenize(",")[0])
    return lambda prompt, negative="", partners=PAIRS: add_partners(prompt, negative, partners, tokenize, **ids)


def test_plain_prompt_gets_its_partner(pair):
    assert pair("a photo of walle") == ("walle-neg", ["walle"])


def test_appends_to_existing_negative(pair):
    assert pair("walle on the moon", "blurry, ") == ("blurry, walle-neg", ["walle"])


@pytest.mark.parametrize("prompt, partner", [
    ("a (walle:1.2) robot", "(walle-neg:1.2)"),
    ("((walle))", "(walle-neg:1.21)"),
    ("[walle]", "(walle-neg:0.9091)"),
    ("(a walle:1.3)", "(walle-neg:1.3)"),
])
def test_the_weight_of_every_syntax_is_carried_to_the_partner(pair, prompt, partner):
    assert pair(prompt, "lowres") == (f"lowres, {partner}", ["walle"])


def test_each_use_gets_its_own_partner(pair):
    assert pair("walle and (walle:1.5)")[0] == "walle-neg, (walle-neg:1.5)"


def test_already_paired_is_left_alone(pair):
    assert pair("walle", "ugly, (walle-neg:0.8)") == ("ugly, (walle-neg:0.8)", [])


def test_several_concepts_compose(pair):
    negative, added = pair("walle in sty-cyber style, with a cat toy")
    assert added == ["walle", "sty-cyber", "cat toy"]
    assert negative == "walle-neg, sty-cyber-neg, cat toy-neg"


@pytest.mark.parametrize("prompt", ["wallet", "awalle", "wallee", "a walle-neg"])
def test_other_words_and_the_negative_name_itself_do_not_match(pair, prompt):
    assert pair(prompt) == ("", [])


@pytest.mark.parametrize("prompt", ["WALLE", "walle2", "walle_2", "xwalle", "sty - cyber",
                                    "cat  toy", "walle,", "(walle)"])
def test_matching_follows_the_tokens_not_the_spelling(pair, prompt):
    """CLIP splits "walle2" into wal|le|2 and "xwalle" into x|wal|le, so the webui uses S^p there and the partner
    must come too; "wallee" (wal|lee) and "awalle" (aw|alle) hold other tokens."""
    assert pair(prompt)[1]


def test_partner_text():
    assert partner_text("walle-neg", 1.0) == "walle-neg"
    assert partner_text("walle-neg", 1.1 * 1.1) == "(walle-neg:1.21)"
