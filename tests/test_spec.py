"""lctx.cache.spec: the KV-cache compression spec string parser."""

import re

import pytest

from lctx.cache import spec as spec_module
from lctx.cache.spec import (DENSE, POLICIES, CompressionSpec, Knob, Policy, PolicyInfo,
                             describe, parse)

SPECS = ["int8", "int8:scale=token", "int8:group=32,scale=token", "int4", "int4:group=64",
         "fp8", "fp8:scale=head", "fp8:format=e5m2", "kivi", "kivi:bits=4,group=16,residual=0",
         "kvquant", "kvquant:bits=2,outliers=0.05,sinks=0", "kvquant:outliers=0"]


@pytest.mark.parametrize("text", SPECS)
def test_round_trip(text):
  spec = parse(text)
  assert parse(str(spec)) == spec
  assert str(parse(str(spec))) == str(spec)
  assert parse(spec) is spec


@pytest.mark.parametrize("text,canonical", [
    ("int8", "int8"),
    ("int8:scale=head", "int8"),
    ("int8:scale=head,group=0", "int8"),
    ("int8:scale=token,group=32", "int8:group=32,scale=token"),
    ("fp8:scale=tensor,format=e4m3", "fp8"),
    ("kivi:bits=2,group=32,residual=128", "kivi"),
    ("kivi:residual=64,bits=4", "kivi:bits=4,residual=64"),
    ("kvquant:bits=4,outliers=0.01,sinks=1", "kvquant"),
    ("kvquant:outliers=0.010", "kvquant"),
    ("kvquant:outliers=0", "kvquant:outliers=0.0"),
    ("kvquant:outliers=.25", "kvquant:outliers=0.25"),
    ("kvquant:outliers=1e-3", "kvquant:outliers=0.001"),
    ("kvquant:outliers=0.00001", "kvquant:outliers=1e-05"),
    ("kvquant:outliers=-0.0", "kvquant:outliers=0.0"),
    ("kvquant:sinks=04", "kvquant:sinks=4"),
])
def test_canonical_string(text, canonical):
  assert str(parse(text)) == canonical


def test_defaults_filled_sorted_and_typed():
  assert parse("int8").quantization.params == (("group", 0), ("scale", "head"))
  assert parse("fp8").quantization.params == (("format", "e4m3"), ("scale", "tensor"))
  assert parse("kivi").quantization.params == (("bits", 2), ("group", 32), ("residual", 128))
  kvquant = parse("kvquant:outliers=0").quantization
  assert kvquant.params == (("bits", 4), ("outliers", 0.0), ("sinks", 1))
  assert type(kvquant["outliers"]) is float and type(kvquant["bits"]) is int
  assert parse("int4:group=64").quantization["group"] == 64
  with pytest.raises(KeyError, match="'bits'.*group, scale"):
    parse("int8").quantization["bits"]


def test_dense():
  for text in (None, "", "  "):
    assert parse(text) is DENSE
  assert DENSE.dense and DENSE.quantization is None and str(DENSE) == ""
  assert DENSE == CompressionSpec() and not parse("int8").dense


def test_equality_and_hashing():
  assert parse("int8") == parse("int8:scale=head") == parse(" int8 : group = 0 ")
  assert parse("int8") != parse("int4") and parse("int8") != parse("int8:scale=token")
  assert hash(parse("int8")) == hash(parse("int8:scale=head,group=0"))
  table = {parse("kivi"): 1, DENSE: 0}
  assert table[parse("kivi:bits=2")] == 1 and table[parse(None)] == 0
  assert len({parse(s) for s in SPECS + ["int8:scale=head", "kivi:group=32"]}) == len(SPECS)


def test_policy_constructor_fills_defaults():
  assert Policy("int4", (("group", 64),)) == parse("int4:group=64").quantization
  assert Policy("kvquant", (("outliers", 0),)) == parse("kvquant:outliers=0").quantization
  assert CompressionSpec([Policy("int8")]) == parse("int8")
  with pytest.raises(ValueError, match="'bits'.*'2'.*one of 2, 4, 8"):
    Policy("kivi", (("bits", "2"),))


def test_whitespace():
  assert parse("  kivi :  bits = 4 , group= 16 ,residual =32 ") == parse(
      "kivi:bits=4,group=16,residual=32")
  assert str(parse("\tfp8:scale=head\n")) == "fp8:scale=head"


def test_kind_and_properties():
  kinds = {name: info.kind for name, info in POLICIES.items()}
  assert {n for n, k in kinds.items() if k == "quantization"} == {
      "int8", "int4", "fp8", "kivi", "kvquant"}
  assert {n for n, k in kinds.items() if k == "eviction"} == {
      "streaming_llm", "h2o", "snapkv", "tova", "keyformer", "knorm", "observed_attention",
      "random", "oracle", "anti_oracle"}
  both = parse("snapkv:ratio=0.9+int8")
  assert both.of_kind("eviction").name == "snapkv" and both.quantization.name == "int8"
  policy = parse("kvquant:bits=2").quantization
  assert policy.name == "kvquant" and policy.kind == "quantization" and policy["bits"] == 2
  assert parse("kvquant:bits=2").policies == (policy,)


def error(text: str, *parts: str):
  """parse(text) raises a ValueError whose message holds every part, in order."""
  pattern = ".*".join(re.escape(p) for p in parts)
  with pytest.raises(ValueError, match=pattern) as info:
    parse(text)
  assert repr(text) in str(info.value)  # the message quotes the whole spec


def test_unknown_policy():
  error("int3", "'int3'", "int8, int4, fp8, kivi, kvquant", "--kv_compression=help")
  error("int8+h3o", "'h3o'", "int8, int4, fp8, kivi, kvquant, offload, streaming_llm, h2o")
  error("int8+h2o", "'h2o' (eviction) must come before 'int8'")
  error("h2o:ratio=1", "policy 'h2o'", "'ratio' = 1.0", "a float in [0.0, 1.0)")
  error("snapkv:kernel=4", "policy 'snapkv'", "'kernel' = 4 must be odd")
  error("INT8", "'INT8'", "known policies")


def test_unknown_key():
  error("int8:bits=8", "policy 'int8'", "'bits'", "scale, group")
  error("kivi:bit=2", "policy 'kivi'", "'bit'", "bits, group, residual")
  error("fp8:group=4", "policy 'fp8'", "'group'", "scale, format")


@pytest.mark.parametrize("text,parts", [
    ("kivi:bits=3", ["policy 'kivi'", "'bits' = 3",  "one of 2, 4, 8"]),
    ("kivi:bits=2.5", ["policy 'kivi'", "'bits'", "'2.5'", "one of 2, 4, 8"]),
    ("kvquant:sinks=+4", ["policy 'kvquant'", "'sinks'", "''", "an int >= 0"]),  # "+" joins
    ("kivi:bits=", ["policy 'kivi'", "'bits'", "''", "one of 2, 4, 8"]),
    ("kivi:bits=four", ["policy 'kivi'", "'bits'", "'four'", "one of 2, 4, 8"]),
    ("kivi:group=0", ["policy 'kivi'", "'group'", "0", "an int >= 1"]),
    ("kivi:residual=-32", ["policy 'kivi'", "'residual'", "-32", "an int >= 0"]),
    ("int8:scale=Head", ["policy 'int8'", "'scale'", "'Head'", "one of head, token"]),
    ("int8:scale=tensor", ["policy 'int8'", "'scale'", "'tensor'", "one of head, token"]),
    ("int4:group=-1", ["policy 'int4'", "'group'", "-1", "an int >= 0"]),
    ("int4:group=1_0", ["policy 'int4'", "'group'", "'1_0'", "an int >= 0"]),
    ("fp8:format=e4m3fn", ["policy 'fp8'", "'format'", "'e4m3fn'", "one of e4m3, e5m2"]),
    ("fp8:scale=token", ["policy 'fp8'", "'scale'", "'token'", "one of tensor, head"]),
    ("kvquant:outliers=0.5", ["policy 'kvquant'", "'outliers'", "0.5", "a float in [0, 0.5)"]),
    ("kvquant:outliers=-0.1", ["policy 'kvquant'", "'outliers'", "a float in [0, 0.5)"]),
    ("kvquant:outliers=nan", ["policy 'kvquant'", "'outliers'", "'nan'", "[0, 0.5)"]),
    ("kvquant:outliers=inf", ["policy 'kvquant'", "'outliers'", "'inf'", "[0, 0.5)"]),
    ("kvquant:sinks=1.0", ["policy 'kvquant'", "'sinks'", "'1.0'", "an int >= 0"]),
])
def test_bad_value(text, parts):
  error(text, *parts)


@pytest.mark.parametrize("text,parts", [
    ("int8+", ["empty policy"]),
    ("+int8", ["empty policy"]),
    ("int8++kivi", ["empty policy"]),
    (":group=4", ["empty policy"]),
    ("int8:", ["policy 'int8'", "''", "not key=value", "scale, group"]),
    ("int8:scale", ["policy 'int8'", "'scale'", "not key=value", "scale, group"]),
    ("int8:scale=head,", ["policy 'int8'", "not key=value"]),
    ("int8:=head", ["policy 'int8'", "'=head'", "not key=value"]),
    ("int8:scale=head,scale=token", ["policy 'int8'", "'scale'", "given twice"]),
    ("int8:group=4,group=4", ["policy 'int8'", "'group'", "given twice"]),
    ("int8:scale=head=token", ["policy 'int8'", "'scale'", "'head=token'", "one of"]),
])
def test_malformed(text, parts):
  error(text, *parts)


def test_two_quantization_policies():
  error("int8+int4", "at most one quantization policy", "int8 and int4",
        "at most one policy of each kind")
  error("kivi+kivi:bits=4", "at most one quantization policy", "kivi and kivi")


def test_kind_order(monkeypatch):
  # Eviction and offload policies will be registered later; fake one of each.
  monkeypatch.setitem(POLICIES, "evict", PolicyInfo("eviction", "test", {
      "keep": Knob(int, 4, "tokens kept", low=1)}))
  monkeypatch.setitem(POLICIES, "offload", PolicyInfo("offload", "test", {}))
  spec = parse("evict:keep=8 + int8 + offload")
  assert [p.kind for p in spec.policies] == ["eviction", "quantization", "offload"]
  assert str(spec) == "evict:keep=8+int8+offload" and parse(str(spec)) == spec
  assert spec.quantization.name == "int8" and spec.of_kind("eviction").name == "evict"
  assert str(parse("offload")) == "offload" and parse("evict+offload").quantization is None
  error("int8+evict", "policy 'evict' (eviction) must come before 'int8' (quantization)",
        "eviction + quantization + offload")
  error("offload+kivi", "'kivi' (quantization) must come before 'offload' (offload)")
  error("evict+evict:keep=2", "at most one eviction policy", "evict and evict")
  with pytest.raises(ValueError, match="kind 'pruning'.*eviction, quantization, offload"):
    PolicyInfo("pruning", "test", {})


def test_kivi_residual_multiple_of_group():
  error("kivi:residual=100", "policy 'kivi'", "'residual' = 100", "multiple of group = 32",
        "0, 32, 64")
  error("kivi:group=64,residual=96", "'residual' = 96", "multiple of group = 64")
  assert parse("kivi:group=16,residual=48").quantization["residual"] == 48
  assert parse("kivi:residual=0").quantization["residual"] == 0


def test_not_a_string():
  with pytest.raises(TypeError):
    parse(8)


def test_describe_lists_every_policy_and_knob():
  text = describe()
  assert "+" in text and "eviction, quantization, offload" in text
  sections = {s.split(" ", 1)[0]: s.splitlines() for s in text.split("\n\n")[1:]}
  assert list(sections) == list(POLICIES)
  for name, info in POLICIES.items():
    line, *knob_lines = sections[name]
    assert line == f"{name} ({info.kind}): {info.doc}"
    assert len(knob_lines) == len(info.knobs)
    for key, knob in info.knobs.items():
      knob_line = next(l for l in knob_lines if l.split()[0] == key)
      assert knob.doc in knob_line
      assert knob.type.__name__ in knob_line and f"default {knob.default}" in knob_line
      assert knob.allowed in knob_line
  assert "arXiv 2402.02750" in text and "arXiv 2401.18079" in text
  assert "one of 2, 4, 8" in text and "a float in [0, 0.5)" in text


def test_module_docstring_lists_every_policy():
  for name in POLICIES:
    assert f"\n  {name} " in spec_module.__doc__


def test_check_passes():
  for text in SPECS:
    parse(text).check(head_dim=128, block=256)
  DENSE.check(head_dim=7)
  parse("int8").check(head_dim=63)  # group 0: any head_dim
  parse("kivi:group=32,residual=64").check(head_dim=64)  # no block: only head_dim
  parse("fp8").check(head_dim=63, block=3)
  parse("kvquant:outliers=0.49").check(head_dim=2)


@pytest.mark.parametrize("text,head_dim,block,parts", [
    ("int8:group=48", 128, None, ["policy 'int8'", "'group' = 48", "head_dim 128",
                                  "0, 1, 2, 4, 8, 16, 32, 64, 128"]),
    ("int4:group=48", 128, None, ["policy 'int4'", "'group' = 48", "an even divisor",
                                  "0, 2, 4, 8, 16, 32, 64, 128"]),
    ("int4:group=1", 64, None, ["policy 'int4'", "'group' = 1", "even", "0, 2, 4"]),
    ("int4", 63, None, ["policy 'int4'", "even head_dim", "head_dim 63"]),
    ("kivi:group=48,residual=96", 128, None, ["policy 'kivi'", "'group' = 48", "head_dim 128",
                                              "1, 2, 4, 8, 16, 32, 64, 128"]),
    ("kivi", 128, 16, ["policy 'kivi'", "'group' = 32", "head_dim 128", "block 16",
                       "1, 2, 4, 8, 16"]),
    ("kivi:group=64,residual=0", 64, 96, ["'group' = 64", "block 96", "1, 2, 4, 8, 16, 32"]),
])
def test_check_errors(text, head_dim, block, parts):
  pattern = ".*".join(re.escape(p) for p in parts)
  with pytest.raises(ValueError, match=pattern) as info:
    parse(text).check(head_dim, block)
  assert repr(str(parse(text))) in str(info.value)
