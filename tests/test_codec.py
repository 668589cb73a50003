"""The CloudEvents <-> NATS codec (pure) and the KV key encoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.codec import CodecError, Event, decode, to_binary, to_structured
from events.keys import decode_name, encode_name, model_key


def test_binary_round_trip_keeps_every_attribute_and_percent_encodes():
    ev = Event(
        "chat.requested",
        {"chat_id": "c1", "text": 'héllo "x" 100%'},
        subject="a b",
        extensions={"traceparent": "00-abc-01"},
    )
    headers, body = to_binary(ev)
    assert headers["ce-subject"] == "a%20b"
    assert all(0x21 <= ord(ch) <= 0x7E for v in headers.values() for ch in v)
    assert decode(headers, body) == ev


def test_structured_round_trip():
    ev = Event("model.load", {"model": "llama3.1:8b"})
    headers, body = to_structured(ev)
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert decode(headers, body) == ev


def test_decodes_raw_json_exactly_as_nats_pub_sends_it():
    # `nats pub ollama.chat.requested '<json>'` sends these bytes with no headers at all.
    raw = (
        b'{"specversion":"1.0","type":"chat.requested","source":"cli","id":"42",'
        b'"data":{"chat_id":"c","model":"gemma3-270m",'
        b'"messages":[{"role":"user","content":"hi"}]}}'
    )
    ev = decode(None, raw)
    assert (ev.id, ev.type, ev.source) == ("42", "chat.requested", "cli")
    assert ev.data["messages"][0]["content"] == "hi"


def test_binary_header_values_may_be_double_quoted():
    ev = decode(
        {"ce-specversion": '"1.0"', "ce-id": '"x"', "ce-type": "t", "ce-source": "s"}, b"{}"
    )
    assert (ev.specversion, ev.id) == ("1.0", "x")


@pytest.mark.parametrize(
    "headers,body,match",
    [
        (None, b"not json", "not valid JSON"),
        (None, b"[1,2]", "JSON object"),
        (None, b'{"type":"x","source":"s","specversion":"1.0"}', "missing required attribute"),
        (None, b'{"id":"1","type":"x","source":"s","specversion":"0.3"}', "specversion"),
        (
            {"ce-specversion": "1.0", "ce-id": "1", "ce-type": "t", "ce-source": "s"},
            b"{bad",
            "not valid JSON",
        ),
        ({"Content-Type": "application/json"}, b"{}", "without ce-specversion"),
        (None, b"{" + b" " * 1_100_000 + b"}", "limit"),
        (None, b'{"id":1,"type":"x","source":"s","specversion":"1.0"}', "must be a string"),
    ],
)
def test_malformed_input_gives_a_clear_error(headers, body, match):
    with pytest.raises(CodecError, match=match):
        decode(headers, body)


@given(st.text(min_size=1, max_size=60))
def test_key_encoding_is_reversible_and_valid(name):
    key = model_key(name)
    assert all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in key)
    assert decode_name(key.removeprefix("model.")) == name


def test_key_encoding_is_readable_for_ollama_names():
    assert encode_name("llama3.1:8b") == "llama3_2e1_3a8b"
    assert json.dumps(decode_name("hf_2eco_2fa_2fb_3aQ4")) == '"hf.co/a/b:Q4"'


@pytest.mark.parametrize(
    ("attr", "value", "says"),
    [
        ("time", 1700000000, "'time' must be a string"),
        ("datacontenttype", 5, "'datacontenttype' must be a string"),
        ("datacontenttype", ["application/json"], "must be a string"),
        ("id", "x" * 1400, "the limit is 256"),
    ],
)
def test_attributes_of_the_wrong_type_or_size_are_refused_with_the_reason(attr, value, says):
    doc = {"specversion": "1.0", "type": "fleet.tick", "source": "s", "id": "i", attr: value}
    with pytest.raises(CodecError, match=says):
        decode({}, json.dumps(doc).encode())


def test_http_headers_decode_like_nats_headers_percent_encoding_included():
    # An HTTP binary-mode request as Knative sends it: lower-case ce- headers, Content-Type.
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "chat.requested",
        "ce-source": "https%3A%2F%2Fexample.com%2Fa%20b",
        "ce-id": "id-1",
        "content-type": "application/json",
    }
    ev = decode(headers, b'{"chat_id": "c"}')
    assert ev.source == "https://example.com/a b" and ev.data == {"chat_id": "c"}
    assert ev.datacontenttype == "application/json"
