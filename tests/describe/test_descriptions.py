"""The description type, the vocabulary and the strict parser of the paper's one-line format."""
from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfyui_harmonize.nodes.describe import HarmonizeDescription
from comfyui_harmonize.pipelines.describe.descriptions import MAX_WORDS_PER_SIDE, VOCABULARY, VOCABULARY_WORDS, Description, DescriptionSet, description_set, make_description, parse_descriptions, quote
from comfyui_harmonize.pipelines.core.errors import InputError

PAPER = "dog & (foreground) bright summer & (background) winter dull greyscale"
DOG = Description("dog", ("bright", "summer"), ("winter", "dull", "greyscale"))


def test_vocabulary_is_the_papers_dictionary():
    # appendix B of the paper, category by category
    assert VOCABULARY == {
        "brightness": ("dazzling", "bright", "dim", "dull", "shaded", "shadowed"),
        "weather": ("cloudy", "sunny", "rainy", "snowy", "foggy", "windy", "stormy", "clear", "misty"),
        "temperature": ("hot", "warm", "cool", "cold", "icy"),
        "season": ("spring", "summer", "autumn", "winter"),
        "time": ("dawn", "sunrise", "daylight", "twilight", "sunset", "dusk", "dark", "night"),
        "color tone": ("greyscale", "neon", "golden", "white", "blue", "green", "yellow", "orange", "red", "earthy"),
        "environment": ("city", "rural", "lake", "ocean", "mountain", "forest", "desert", "grassland", "sky",
                        "space", "indoor", "street"),
    }
    assert len(VOCABULARY_WORDS) == 54 == sum(len(v) for v in VOCABULARY.values())


def test_papers_example():
    found, dropped = parse_descriptions(PAPER)
    assert found == [DOG] and dropped == []
    assert DOG.source_prompt() == "dog bright summer"
    assert DOG.target_prompt() == "dog winter dull greyscale"
    assert parse_descriptions(DOG.line())[0] == [DOG]  # line() round-trips


@pytest.mark.parametrize("text", [
    "DOG & (FOREGROUND) Bright Summer & (BACKGROUND) Winter Dull Greyscale",
    "  dog&(foreground)bright summer&(background)winter dull greyscale  ",
    "dog & ( foreground ) bright, summer. & ( background ) winter; dull, grayscale!",
    "1. dog & (foreground) bright summer & (background) winter dull greyscale",
    "- **dog** & *(foreground)* bright summer & *(background)* winter dull greyscale",
    "`dog & (foreground) bright summer & (background) winter dull greyscale`",
    "* Object: dog | foreground: bright summer | background: winter dull greyscale",
    "dog & [foreground] bright summer & [background] winter dull greyscale",
    "dog, foreground: bright, summer; background: winter, dull, greyscale",
    '"dog & (foreground) bright summer & (background) winter dull greyscale"',
    "(2) dog & (fore-ground) bright summer & (back ground) winter dull greyscale",
    "dog & (background) winter dull greyscale & (foreground) bright summer",  # sides swapped
])
def test_tolerated_variants(text):
    assert parse_descriptions(text)[0] == [DOG]


def test_several_candidates_prose_and_markdown_around_them():
    text = ("Here are three descriptions:\n\n```\n"
            "1. teddy bear & (foreground) bright sunny & (background) dark night cold\n"
            "2. Teddy Bear & (foreground) warm golden & (background) blue dusk\n"
            "3. teddy bear & (foreground) sunny bright & (background) night cold dark\n"  # same sets as 1
            "```\nI hope this helps!")
    found, dropped = parse_descriptions(text)
    assert found == [Description("teddy bear", ("bright", "sunny"), ("dark", "night", "cold")),
                     Description("teddy bear", ("warm", "golden"), ("blue", "dusk"))]
    assert dropped == []


def test_out_of_vocabulary_words_are_dropped_and_reported():
    found, dropped = parse_descriptions("cat & (foreground) bright shiny vivid & (background) moody dim and cold\n"
                                        "cat & (foreground) shiny & (background) dark")
    assert found == [Description("cat", ("bright",), ("dim", "cold"))]  # line 2 has no foreground word left
    assert dropped == ["shiny", "vivid", "moody", "and"]
    # without the vocabulary every word is kept
    free, none = parse_descriptions("cat & (foreground) bright shiny & (background) moody", vocabulary=None)
    assert free == [Description("cat", ("bright", "shiny"), ("moody",))] and none == []


def test_side_without_vocabulary_words_is_rejected_with_reason():
    with pytest.raises(InputError) as err:
        parse_descriptions("cat & (foreground) shiny vivid & (background) dim")
    msg = str(err.value)
    assert "no foreground word from the vocabulary" in msg and "shiny, vivid" in msg
    assert '"cat & (foreground) shiny vivid & (background) dim"' in msg  # the text is quoted
    assert "OBJECT & (foreground)" in msg  # and the expected format is named


@pytest.mark.parametrize("text, reason", [
    ("& (foreground) bright & (background) dim", "no object name"),
    ("123 & (foreground) bright & (background) dim", "no object name"),
    ("cat & (foreground) bright", "exactly one (foreground) and one (background)"),
    ("cat & (foreground) bright & (foreground) warm & (background) dim", "exactly one (foreground)"),
    ("cat & (foreground) & (background) dim", "no foreground word"),
    ("cat & (foreground) bright & (background)", "no background word"),
    ("the big fluffy brown cat sitting there & (foreground) bright & (background) dim", "longer than 5 words"),
    ("The foreground is bright and the background is dim.", "no line has (foreground) and (background) markers"),
    ("OBJECT & (foreground) W W ... & (background) W W ...", "no foreground and no background words"),
    ("I cannot help with that.", "no line has"),
])
def test_garbage_is_rejected(text, reason):
    with pytest.raises(InputError, match="no valid description") as err:
        parse_descriptions(text)
    assert reason in str(err.value)


@pytest.mark.parametrize("text", ["", "   ", "\n\n\t"])
def test_empty_text(text):
    with pytest.raises(InputError, match="empty"):
        parse_descriptions(text)


def test_not_a_string():
    with pytest.raises(InputError, match="must be a string"):
        parse_descriptions(None)  # type: ignore[arg-type]


def test_very_long_answers():
    # a rambling answer: the error quotes its start and end, not all of it
    rambling = "I think " + "the picture is quite nice " * 40000 + "THE END"
    with pytest.raises(InputError) as err:
        parse_descriptions(rambling)
    msg = str(err.value)
    assert len(msg) < 2000 and '"I think the picture' in msg and 'THE END"' in msg and "characters omitted" in msg
    # a valid line buried in a long answer is still found
    found, _ = parse_descriptions("blah " * 50000 + "\n" + PAPER + "\n" + "more " * 50000)
    assert found == [DOG]
    # a side with every vocabulary word keeps MAX_WORDS_PER_SIDE words, reports the rest
    words = sorted(VOCABULARY_WORDS)
    found, dropped = parse_descriptions(f"cat & (foreground) {' '.join(words * 3)} & (background) dim")
    assert found[0].foreground == tuple(words[:MAX_WORDS_PER_SIDE])
    assert dropped == words[MAX_WORDS_PER_SIDE:]
    # thousands of candidate lines: all kept, deduplicated
    many = "\n".join(f"cat & (foreground) {a} & (background) {b}" for a in words for b in words)
    assert len(parse_descriptions(many)[0]) == len(words) ** 2


def test_quote_shortens_but_keeps_short_texts_whole():
    assert quote('a "b"\nc') == '"a \\"b\\"\\nc"'
    long = quote("x" * 10000, limit=100)
    assert long.count("x") == 100 and "9900 characters omitted" in long


def test_make_description_fields():
    desc, dropped = make_description("  Teddy Bear ", "bright, sunny", ["snowy", "frosty", "cold"])
    assert desc == Description("teddy bear", ("bright", "sunny"), ("snowy", "cold")) and dropped == ["frosty"]
    with pytest.raises(InputError, match="no object name"):
        make_description("", "bright", "dim")
    with pytest.raises(InputError, match="no background word from the vocabulary"):
        make_description("cat", "bright", "frosty")
    assert make_description("cat", "bright", "frosty", vocabulary=None)[0].background == ("frosty",)


def test_description_set_regenerate_falls_back_to_unused_candidates():
    a, b = DOG, Description("dog", ("dim",), ("sunny",))
    assert DescriptionSet([a, b]).regenerate([a]) == b
    assert DescriptionSet([a, b]).regenerate([a, b]) is None
    asked = []

    def ask_again(tried):
        asked.append(list(tried))
        return Description("dog", ("warm",), ("cold",))

    assert DescriptionSet([a], ask_again=ask_again).regenerate([a]) == Description("dog", ("warm",), ("cold",))
    assert asked == [[a]]
    # a source that repeats a tried one is not trusted: the next unused candidate comes instead
    assert DescriptionSet([a, b], ask_again=lambda tried: a).regenerate([a]) == b


class _Shown:
    """The description node's result, checking that what it shows on the node is its text output."""

    def build(self, *args):
        out = HarmonizeDescription().build(*args)
        assert out["ui"] == {"text": [out["result"][1]]}
        return out["result"]


def test_description_node_text_and_fields():
    node = _Shown()
    descs, text = node.build("dog", "bright summer", "winter dull greyscale", "", True)
    assert descs.candidates == [DOG] and text == PAPER
    descs, text = node.build("ignored", "x", "y", PAPER + "\ncat & (foreground) dim glossy & (background) red", True)
    assert descs.candidates == [DOG, Description("cat", ("dim",), ("red",))]
    assert text.splitlines() == [PAPER, "cat & (foreground) dim & (background) red",
                                 "# left out (not in the vocabulary): glossy"]
    # the shown text reads back to the same candidates
    assert node.build("", "", "", text, True)[0].candidates == descs.candidates
    descs, _ = node.build("vase", "glossy", "sepia", "", False)
    assert descs.candidates == [Description("vase", ("glossy",), ("sepia",))]
    with pytest.raises(InputError):
        node.build("vase", "glossy", "sepia", "", True)
    assert description_set(PAPER).raw == PAPER


# ------------------------------------------------------------------------------------- properties
_vocab = sorted(VOCABULARY_WORDS)
_noise = st.text(alphabet=string.ascii_letters + string.digits + " ,.;:!?&|()[]*-_#`\"'\t", max_size=40)
_side = st.lists(st.one_of(st.sampled_from(_vocab), st.sampled_from(_vocab), st.sampled_from(_vocab),
                           st.text(string.ascii_lowercase, min_size=1, max_size=8)), max_size=6).map(" ".join)
_marker = st.sampled_from(["(foreground)", "(Foreground)", "foreground:", "[foreground]", "FOREGROUND", "fore ground"])
_bmarker = st.sampled_from(["(background)", "background:", "[BACKGROUND]", "background", "(back-ground)"])
_object = st.one_of(st.sampled_from(["dog", "Teddy Bear", "1. cat", "- **vase**", "Object: car"]), _noise)
_line = st.tuples(_object, st.sampled_from([" & ", "&", " | ", ", ", " "]), _marker, _side, st.sampled_from([" & ", " "]),
                  _bmarker, _side, _noise).map(lambda t: "".join(t[:2]) + " ".join(t[2:]))
_texts = st.one_of(st.text(max_size=300), st.lists(st.one_of(_line, _line, _noise), min_size=1, max_size=6).map("\n".join))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts)
def test_parser_never_crashes_nor_returns_words_outside_the_vocabulary(text):
    try:
        found, dropped = parse_descriptions(text)
    except InputError as exc:
        assert str(exc)
        return
    assert found, "success means at least one description"
    assert len({d.key() for d in found}) == len(found)  # no duplicates
    for d in found:
        assert d.object and d.object == d.object.strip().lower()
        assert 1 <= len(d.foreground) <= MAX_WORDS_PER_SIDE and 1 <= len(d.background) <= MAX_WORDS_PER_SIDE
        assert set(d.foreground) <= VOCABULARY_WORDS and set(d.background) <= VOCABULARY_WORDS
        assert "&" not in d.object and "(" not in d.object
    assert all(w.isalpha() and w == w.lower() for w in dropped)


@settings(max_examples=150, deadline=None)
@given(st.text(string.ascii_lowercase, min_size=1, max_size=12), st.lists(st.sampled_from(_vocab), min_size=1, max_size=4),
       st.lists(st.sampled_from(_vocab), min_size=1, max_size=4))
def test_every_well_formed_line_parses_to_itself(obj, fg, bg):
    if "ground" in obj:  # "foreground" as the object's name would be a marker
        return
    desc = Description(obj, tuple(dict.fromkeys(fg)), tuple(dict.fromkeys(bg)))
    assert parse_descriptions(desc.line())[0] == [desc]
