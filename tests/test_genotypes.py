"""Genotype files and strings: quark0's flat form, the TensorFlow port's nested form, and bad input."""
import json

import pytest

from approxdarts_np.errors import UserError
from approxdarts_np.nas.genotypes import DARTS_V2, Genotype, GenotypeError, read_genotype

# DARTS_V2 as the authors' TensorFlow port prints it: one list of two pairs per node.
TF_PORT_STRING = (
    "Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], "
    "[('sep_conv_3x3', 1), ('skip_connect', 0)], [('skip_connect', 0), ('dil_conv_3x3', 2)]], "
    "normal_concat=[2, 3, 4, 5], "
    "reduce=[[('max_pool_3x3', 0), ('max_pool_3x3', 1)], [('skip_connect', 2), ('max_pool_3x3', 1)], "
    "[('max_pool_3x3', 0), ('skip_connect', 2)], [('skip_connect', 2), ('max_pool_3x3', 1)]], "
    "reduce_concat=[2, 3, 4, 5])")

OTHER = Genotype(
    normal=(("dil_conv_5x5", 1), ("avg_pool_3x3", 0), ("sep_conv_5x5", 2), ("max_pool_3x3", 1),
            ("skip_connect", 3), ("dil_conv_3x3", 0), ("sep_conv_3x3", 4), ("sep_conv_5x5", 2)),
    normal_concat=(2, 4, 5),
    reduce=(("max_pool_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_5x5", 0), ("sep_conv_3x3", 2),
            ("skip_connect", 3), ("max_pool_3x3", 1), ("dil_conv_3x3", 4), ("sep_conv_5x5", 0)),
    reduce_concat=(2, 3, 4, 5),
)


def nested(pairs):
    return [[list(pairs[k]), list(pairs[k + 1])] for k in range(0, len(pairs), 2)]


def test_round_trips_keep_the_api():
    for g in (DARTS_V2, OTHER):
        assert Genotype.from_dict(g.to_dict()) == g
        assert Genotype.from_dict(json.loads(g.to_json())) == g
        assert Genotype.from_darts_string(g.to_darts_string()) == g
        assert isinstance(g.normal, tuple) and all(isinstance(p, tuple) for p in g.normal)
    assert "normal_concat=range(2, 6)" in DARTS_V2.to_darts_string()
    assert "normal_concat=[2, 4, 5]" in OTHER.to_darts_string()
    assert DARTS_V2.to_dict()["normal"][5] == ["skip_connect", 0]


def test_tensorflow_port_string_equals_the_flat_form(tmp_path):
    assert Genotype.from_darts_string(TF_PORT_STRING) == DARTS_V2
    assert read_genotype(TF_PORT_STRING) == DARTS_V2
    (tmp_path / "tf.txt").write_text(TF_PORT_STRING + "\n")
    assert read_genotype(tmp_path / "tf.txt") == DARTS_V2
    # A line copied out of a genotypes.py, positional fields, tuples for the concat.
    assert read_genotype("DARTS_V2 = " + TF_PORT_STRING) == DARTS_V2
    positional = ("Genotype([('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
                  "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
                  "(2, 3, 4, 5), " + DARTS_V2.to_darts_string().split("reduce=")[1].replace(
                      "reduce_concat=", ""))
    assert read_genotype(positional) == DARTS_V2


def test_tensorflow_port_json_equals_the_flat_form(tmp_path):
    d = DARTS_V2.to_dict()
    d["normal"], d["reduce"] = nested(DARTS_V2.normal), nested(DARTS_V2.reduce)
    (tmp_path / "tf.json").write_text(json.dumps(d))
    assert read_genotype(tmp_path / "tf.json") == DARTS_V2
    assert Genotype.from_dict(d) == DARTS_V2
    # Constructing directly from nested tuples normalises to the flat form too.
    assert Genotype(nested(OTHER.normal), [2, 4, 5], OTHER.reduce, range(2, 6)) == OTHER


@pytest.mark.parametrize("name, text", [("g.txt", DARTS_V2.to_darts_string()), ("g.json", DARTS_V2.to_json()),
                                        ("tf.txt", TF_PORT_STRING)])
def test_utf8_byte_order_mark_is_ignored(tmp_path, name, text):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_genotype(tmp_path / name) == DARTS_V2
    assert read_genotype("\ufeff" + DARTS_V2.to_darts_string()) == DARTS_V2


def test_darts_v2_by_name():
    assert read_genotype("DARTS_V2") is DARTS_V2
    assert read_genotype("darts_v2") is DARTS_V2


def _json_with(**changes):
    d = DARTS_V2.to_dict()
    for key, value in changes.items():
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return json.dumps(d).encode()


def _string_with(old, new):
    text = DARTS_V2.to_darts_string()
    assert old in text
    return text.replace(old, new, 1).encode()


NODE = "[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]"

BAD = {
    # concat
    "concat_out_of_range.txt": (_string_with("normal_concat=range(2, 6)", "normal_concat=range(2, 7)"),
                                "state index 6 is out of range"),
    "concat_negative.json": (_json_with(reduce_concat=[2, -1]), "state index -1 is out of range"),
    "concat_empty.txt": (_string_with("normal_concat=range(2, 6)", "normal_concat=[]"), "normal_concat is empty"),
    "concat_empty_range.txt": (_string_with("reduce_concat=range(2, 6)", "reduce_concat=range(2, 2)"),
                               "reduce_concat is empty"),
    "concat_empty.json": (_json_with(normal_concat=[]), "normal_concat is empty"),
    "concat_not_list.json": (_json_with(normal_concat=5), "normal_concat must be a list"),
    "concat_string_entry.json": (_json_with(normal_concat=["2", 3]), "must be integers"),
    "concat_float_entry.json": (_json_with(reduce_concat=[2.5, 3]), "must be integers"),
    # node and pair counts
    "single_node.txt": (f"Genotype(normal={NODE}, normal_concat=[2], reduce={NODE}, reduce_concat=[2])".encode(),
                        "4 nodes with 2 inputs each (8 pairs), found 2 pairs"),
    "odd_pairs.json": (_json_with(normal=DARTS_V2.to_dict()["normal"][:7]), "found 7 pairs"),
    "too_many_pairs.json": (_json_with(reduce=DARTS_V2.to_dict()["reduce"] * 2), "found 16 pairs"),
    "no_pairs.json": (_json_with(normal=[]), "found 0 pairs"),
    "nested_three_inputs.json": (_json_with(normal=[[["sep_conv_3x3", 0]] * 3] * 4),
                                 "node 0 has 3 inputs"),
    "nested_three_nodes.json": (_json_with(normal=nested(DARTS_V2.normal)[:3]), "found 6 pairs"),
    "nested_mixed.json": (_json_with(normal=nested(DARTS_V2.normal)[:2] + DARTS_V2.to_dict()["normal"][4:]),
                          "like the other nodes"),
    "pair_of_four.json": (_json_with(normal=[["sep_conv_3x3", 0, "mul8u_2P7", 1]] * 8),
                          "must be an (operation, input) pair"),
    # operations and inputs
    "unknown_op.txt": (_string_with("'dil_conv_3x3', 2", "'conv_9x9', 2"), "unknown operation 'conv_9x9'"),
    "none_op.json": (_json_with(normal=[["none", 0]] + DARTS_V2.to_dict()["normal"][1:]), "'none' cannot be"),
    "input_out_of_range.txt": (_string_with("('dil_conv_3x3', 2)", "('dil_conv_3x3', 5)"),
                               "node 3 cannot take input 5"),
    "input_negative.json": (_json_with(normal=[["sep_conv_3x3", -1]] + DARTS_V2.to_dict()["normal"][1:]),
                            "node 0 cannot take input -1"),
    "node0_takes_node.json": (_json_with(reduce=[["max_pool_3x3", 2]] + DARTS_V2.to_dict()["reduce"][1:]),
                              "node 0 cannot take input 2"),
    # wrong types in JSON
    "index_string.json": (_json_with(normal=[["sep_conv_3x3", "0"]] + DARTS_V2.to_dict()["normal"][1:]),
                          "input index must be an integer, got '0'"),
    "index_float.json": (_json_with(normal=[["sep_conv_3x3", 0.5]] + DARTS_V2.to_dict()["normal"][1:]),
                         "input index must be an integer"),
    "index_bool.json": (_json_with(normal=[["sep_conv_3x3", True]] + DARTS_V2.to_dict()["normal"][1:]),
                        "input index must be an integer"),
    "op_number.json": (_json_with(normal=[[4, 0]] + DARTS_V2.to_dict()["normal"][1:]), "must be a name, got 4"),
    "normal_string.json": (_json_with(normal="sep_conv_3x3"), "normal must be a list"),
    "normal_object.json": (_json_with(reduce={"a": 1}), "reduce must be a list"),
    "top_level_list.json": (b"[1, 2, 3]", "must be an object with keys"),
    "top_level_null.json": (b"null", "not a DARTS genotype string"),
    "missing_key.json": (_json_with(reduce_concat=KeyError), "missing reduce_concat"),
    "missing_keys.txt": (f"Genotype(normal={[tuple(p) for p in DARTS_V2.normal]})".encode(),
                         "missing normal_concat, reduce, reduce_concat"),
    "unknown_field.txt": (_string_with("reduce_concat=", "reduce_concat=range(2, 6), extra="),
                          "unknown genotype field 'extra'"),
    "truncated.json": (DARTS_V2.to_json()[:40].encode(), "not valid JSON"),
    "truncated.txt": (DARTS_V2.to_darts_string()[:80].encode(), "not a DARTS genotype string"),
    "code.txt": (b"Genotype(normal=__import__('os').system('true'))", "cannot parse the genotype string"),
    "deep.json": (b"[" * 100000 + b"]" * 100000, "genotype file"),
    # files that are not text
    "empty.txt": (b"", "is empty"),
    "blank.json": (b"  \n\n", "is empty"),
    "binary.bin": (bytes(range(256)) * 4, "binary file"),
    "latin1.txt": (DARTS_V2.to_darts_string().replace("normal", "n\xf6rmal", 1).encode("latin-1"),
                   "not UTF-8 text"),
    "utf16.txt": (DARTS_V2.to_darts_string().encode("utf-16"), "UTF-16"),
    "utf16le_nobom.json": (DARTS_V2.to_json().encode("utf-16-le"), "UTF-16"),
    "utf16be_nobom.txt": (DARTS_V2.to_darts_string().encode("utf-16-be"), "UTF-16"),
    "huge.txt": (b" " * (1 << 20) + b"x", "bytes; a genotype is a few hundred"),
    # integers past Python's 4,300-digit limit, and a range too long to spell out
    "long_index.json": (json.dumps(DARTS_V2.to_dict()).replace('"sep_conv_3x3", 0', '"sep_conv_3x3", ' + "9" * 5000, 1).encode(),
                        "a number in it has more than 4,300 digits"),
    "long_concat.json": (json.dumps(DARTS_V2.to_dict()).replace("[2, 3, 4, 5]", "[2, " + "7" * 5000 + "]", 1).encode(),
                         "a number in it has more than 4,300 digits"),
    "long_index.txt": (DARTS_V2.to_darts_string().replace("('sep_conv_3x3', 0)", "('sep_conv_3x3', " + "9" * 5000 + ")",
                                                          1).encode(), "a number in it has more than 4,300 digits"),
    "long_range.txt": (DARTS_V2.to_darts_string().replace("range(2, 6)", "range(2, " + "9" * 5000 + ")", 1).encode(),
                       "is not a concat"),
    "wide_range.txt": (DARTS_V2.to_darts_string().replace("range(2, 6)", "range(2, 600000000)", 1).encode(),
                       "'range(2, 600000000)' is not a concat"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_genotype_file_is_one_line_naming_the_file(tmp_path, name):
    content, expected = BAD[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        read_genotype(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message and len(message) < 400


@pytest.mark.parametrize("spec, expected", [
    ("missing.json", "does not exist"),
    (".", "is not a file"),
])
def test_bad_genotype_path(tmp_path, monkeypatch, spec, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=expected):
        read_genotype(spec)


def test_bad_inline_string_says_so():
    with pytest.raises(UserError, match=r"^genotype string: .*unknown operation 'conv_9x9'"):
        read_genotype(DARTS_V2.to_darts_string().replace("dil_conv_3x3", "conv_9x9"))
    with pytest.raises(UserError, match=r"^genotype string: normal_concat is empty"):
        read_genotype(DARTS_V2.to_darts_string().replace("normal_concat=range(2, 6)", "normal_concat=[]"))


def test_constructor_checks_stay_value_errors():
    """Code that builds a Genotype and catches ValueError keeps working; the CLI sees a UserError."""
    with pytest.raises(ValueError):
        Genotype(normal=DARTS_V2.normal[:7], normal_concat=(2, 3, 4, 5), reduce=DARTS_V2.reduce,
                 reduce_concat=(2, 3, 4, 5))
    with pytest.raises(GenotypeError):
        Genotype(normal=DARTS_V2.normal, normal_concat=(), reduce=DARTS_V2.reduce, reduce_concat=(2, 3, 4, 5))
    with pytest.raises(UserError):
        Genotype.from_dict({"normal": DARTS_V2.to_dict()["normal"]})


@pytest.mark.parametrize("entry, expected", [
    (["sep_conv_3x3", 10 ** 5000], "cannot take input an integer of about 5001 digits"),
    (["sep_conv_3x3", 1, 2, 10 ** 5000], "got a list holding an integer too long to print"),
    (["x" * 10000, 0], "unknown operation 'xxxx"),
])
def test_huge_values_in_a_genotype_dict_are_named_briefly(entry, expected):
    d = DARTS_V2.to_dict()
    with pytest.raises(GenotypeError) as info:
        Genotype.from_dict({**d, "normal": [entry] + d["normal"][1:]})
    assert expected in str(info.value) and len(str(info.value)) < 300
