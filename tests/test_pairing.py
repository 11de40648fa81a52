"""Automatic pairing of NAME with NAME-neg on the negative side (paper sec. 4.1, 6.7)."""
from dreamartist.pairing import add_partners, words_in

PAIRS = {"walle": "walle-neg", "cat toy": "cat toy-neg", "sty-cyber": "sty-cyber-neg"}


def test_plain_prompt_gets_its_partner():
    assert add_partners("a photo of walle", "", PAIRS) == ("walle-neg", ["walle"])


def test_appends_to_existing_negative():
    assert add_partners("walle on the moon", "blurry, ", PAIRS) == ("blurry, walle-neg", ["walle"])


def test_weight_is_carried_to_the_partner():
    negative, added = add_partners("a (walle:1.2) robot", "lowres", PAIRS)
    assert negative == "lowres, (walle-neg:1.2)" and added == ["walle"]


def test_already_paired_is_left_alone():
    assert add_partners("walle", "ugly, (walle-neg:0.8)", PAIRS) == ("ugly, (walle-neg:0.8)", [])


def test_several_concepts_compose():
    negative, added = add_partners("walle in sty-cyber style, with a cat toy", "", PAIRS)
    assert added == ["walle", "sty-cyber", "cat toy"]
    assert negative == "walle-neg, sty-cyber-neg, cat toy-neg"


def test_partial_words_and_the_negative_name_itself_do_not_match():
    assert words_in("wallet, wallee, walle-neg, xwalle", PAIRS) == []
    assert add_partners("a walle-neg", "", PAIRS) == ("", [])


def test_case_insensitive_like_prompts():
    assert add_partners("WALLE", "", PAIRS)[1] == ["walle"]


def test_a_partner_is_added_once_even_when_two_names_differ_only_in_case():
    partners = {"walle": "walle-neg", "WALLE": "WALLE-neg"}  # e.g. two files in different subfolders
    negative, added = add_partners("a photo of walle", "", partners)
    assert negative.lower() == "walle-neg" and len(added) == 1
