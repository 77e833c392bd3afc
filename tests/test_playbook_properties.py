"""Properties of playbook validation on random input (no database): accept a sound playbook or refuse it in one line."""

from __future__ import annotations

import copy
import string

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import Playbook, parse

EXAMPLES = settings(max_examples=200, deadline=None)

BASE = {
    "name": "prop_test",
    "table": {"schema": "public", "name": "workflow_templates"},
    "column": {"name": "workflow_type", "enum_type": "workflowtype"},
    "target": {"type": "varchar", "length": 50},
    "mapping": {"plain": "simple_chat", "rag": "rag_chat", "tools": "function_chat", "full": "advanced_chat"},
}

# Text that collides often (short strings over a small alphabet) plus arbitrary unicode with control characters,
# NUL, line separators: the shapes most likely to break a check or a message.
nasty = st.one_of(
    st.text(alphabet="ab\n\x00é ", max_size=3),
    st.text(max_size=8),
)
targets = st.one_of(
    st.just({"type": "text"}),
    st.builds(lambda n: {"type": "varchar", "length": n}, st.integers(1, 12)),
)


@st.composite
def wild_playbooks(draw) -> dict:
    """Anything goes: most of these are refused."""
    data = copy.deepcopy(BASE)
    data["mapping"] = draw(st.dictionaries(nasty, nasty, max_size=6))
    data["target"] = draw(targets)
    rollback: dict = {}
    if draw(st.booleans()):
        rollback["reverse_mapping"] = draw(st.dictionaries(nasty, nasty, max_size=3))
    if draw(st.booleans()):
        rollback["unmapped"] = "fallback"
        rollback["fallback_label"] = draw(st.one_of(st.none(), nasty, st.sampled_from(sorted(data["mapping"]) or [""])))
    if rollback:
        data["rollback"] = rollback
    return data


@st.composite
def plausible_playbooks(draw) -> dict:
    """Shaped like a real playbook, so many are accepted; random text still collides, overflows or holds NUL."""
    data = copy.deepcopy(BASE)
    text = st.text(min_size=1, max_size=8)
    mapping = draw(st.dictionaries(text, text, min_size=1, max_size=6))
    data["mapping"] = mapping
    data["target"] = draw(st.one_of(st.just({"type": "text"}),
                                    st.builds(lambda n: {"type": "varchar", "length": n}, st.integers(4, 12))))
    labels = st.sampled_from(sorted(mapping))
    rollback: dict = {}
    if draw(st.booleans()):
        rollback["reverse_mapping"] = draw(st.dictionaries(text, labels, max_size=3))
    if draw(st.booleans()):
        rollback.update(unmapped="fallback", fallback_label=draw(labels))
    if rollback:
        data["rollback"] = rollback
    return data


playbooks = st.one_of(wild_playbooks(), plausible_playbooks())


def outcome(data: dict) -> Playbook | BadInput:
    try:
        return parse(data)
    except BadInput as err:
        return err


def assert_one_line(err: BadInput) -> None:
    text = str(err)
    assert text and text.splitlines() == [text], repr(text)
    assert "\x00" not in text


@EXAMPLES
@given(playbooks)
def test_parse_accepts_or_refuses_in_one_line(data):
    result = outcome(data)  # any other exception fails the test
    if isinstance(result, BadInput):
        assert_one_line(result)
        assert str(result).startswith("playbook: ")


@EXAMPLES
@given(plausible_playbooks())
def test_accepted_mappings_are_sound(data):
    pb = outcome(data)
    assume(isinstance(pb, Playbook))
    labels, values = list(pb.mapping), list(pb.mapping.values())
    assert len(set(values)) == len(values)  # injective
    assert all(labels) and all(values)
    if pb.target.type == "varchar":
        assert all(len(v) <= pb.target.length for v in values)
    for label, value in pb.mapping.items():
        assert value == label or value not in labels  # never another label's name
        assert pb.migrations[0].reverse[value] == label  # the reverse inverts the mapping exactly
    for value, label in pb.rollback.reverse_mapping.items():
        assert value not in labels and value not in values
        assert label in labels and pb.migrations[0].reverse[value] == label
    if pb.rollback.unmapped == "fallback":
        assert pb.rollback.fallback_label in labels
    everything = [*labels, *values, *pb.rollback.reverse_mapping, *pb.rollback.reverse_mapping.values()]
    assert not any("\x00" in s for s in everything)  # PostgreSQL text cannot store it


def _fresh(pb: Playbook) -> str:
    """A value no label or value uses, short enough for the target."""
    used = {*pb.mapping, *pb.mapping.values(), *pb.rollback.reverse_mapping}
    return next(c for c in string.ascii_letters + string.digits if c not in used)


@EXAMPLES
@given(plausible_playbooks(), st.data())
def test_fingerprint_stable_and_sensitive_to_the_mapping(data, draw):
    pb = outcome(data)
    assume(isinstance(pb, Playbook) and pb.mapping)
    # equal playbooks (rebuilt, keys in another order, another description) give the same fingerprint
    again = copy.deepcopy(data)
    again["mapping"] = dict(reversed(list(data["mapping"].items())))
    again["description"] = "edited prose does not count"
    twin = parse(again)
    assert twin.fingerprint() == pb.fingerprint() and len(pb.fingerprint()) == 16
    # any change of the mapping changes it
    label = draw.draw(st.sampled_from(sorted(pb.mapping)))
    changed = copy.deepcopy(data)
    changed["mapping"][label] = _fresh(pb)
    assert parse(changed).fingerprint() != pb.fingerprint()
    dropped = copy.deepcopy(data)
    del dropped["mapping"][label]
    if dropped["mapping"] and dropped.get("rollback", {}).get("fallback_label") != label \
            and label not in dropped.get("rollback", {}).get("reverse_mapping", {}).values():
        assert parse(dropped).fingerprint() != pb.fingerprint()


KNOWN_KEYS = {
    (): set(Playbook.model_fields) | {"schema"},  # every alias and field name of the models, to be excluded
    ("table",): {"schema", "name"},
    ("column",): {"name", "enum_type", "enum_schema", "shadow", "retired"},
    ("target",): {"type", "length", "nullable", "default"},
    ("rollback",): {"unmapped", "fallback_label", "reverse_mapping"},
    ("settings",): set(),  # filled below
    ("seed_rows",): {"key", "rows"},
}
KNOWN_KEYS[("settings",)] = set(Playbook.model_fields["settings"].annotation.model_fields)


@EXAMPLES
@example(where=(), key="", value=1)  # an empty key once slipped through as a field-less message
@example(where=("table",), key="schema_", value="public")  # the Python name of the `schema` field
@given(st.sampled_from(sorted(KNOWN_KEYS)), st.one_of(st.text(max_size=12), st.integers(), st.booleans()),
       st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers(), max_size=2)))
def test_unknown_keys_are_always_rejected(where, key, value):
    assume(key not in KNOWN_KEYS[where])
    data = copy.deepcopy(BASE)
    node = data
    for part in where:
        node = node.setdefault(part, {})
    node[key] = value
    result = outcome(data)
    assert isinstance(result, BadInput), f"{key!r} accepted in {where}"
    assert_one_line(result)
    if isinstance(key, str) and "\x00" not in key and not (isinstance(value, str) and "\x00" in value):
        assert "unknown key" in str(result)


def test_base_is_valid():
    parse(copy.deepcopy(BASE))


@pytest.mark.parametrize("key", ["schema_", "model_config", "__class__", "Name", " name"])
def test_python_spellings_of_keys_are_unknown(key):
    data = copy.deepcopy(BASE)
    del data["table"]["schema"]  # alone, not beside the real key
    data["table"][key] = "public"
    with pytest.raises(BadInput, match="unknown key"):
        parse(data)
