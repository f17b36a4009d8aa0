"""The encoders every published body goes through (api_bodies): the one JSON encoder writes the bytes the
stdlib's compact UTF-8 ``json.dumps`` writes, so moving it to msgspec changed no endpoint's bytes; the one
CSV writer takes a row as a mapping or as values in the fields' order, whatever the number of fields.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from m365_pipeline.api_bodies import csv_bytes, json_bytes


def stdlib(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@pytest.mark.parametrize("text", [
    "", "Anna", "Müller & Söhne / R&D ../100% ?#", "Ромашка 日本 Ωμέγα", "😀 \U0010ffff", '"quoted" \\ back',
    "".join(map(chr, range(0x20))), "\x7f\x85\u2028\u2029\ufeff", "</script><b>x</b>", "=HYPERLINK(\"x\")",
])
def test_json_bytes_writes_a_name_as_the_stdlib_does(text: str) -> None:
    payload = {"organization_name": text, text: [text], "n": 3}
    assert json_bytes(payload) == stdlib(payload)


@pytest.mark.parametrize("number", [0, 1, 250, 2**53, 0.0, 0.01, 0.1, 0.5, 12.34, 99.99, 1234567.89,
                                    99999999999999.99, True, False, None])
def test_json_bytes_writes_counts_averages_and_flags_as_the_stdlib_does(number: Any) -> None:
    payload = {"status": "success", "value": number, "values": [number, {"x": number}]}
    assert json_bytes(payload) == stdlib(payload)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8")), st.integers(0, 10**9).map(lambda hundredths: hundredths / 100))
def test_json_bytes_agrees_with_the_stdlib_on_any_name_and_any_average(text: str, average: float) -> None:
    payload = {"organization": text, "licenses": [{"license_name": text, "users_average": average}]}
    assert json_bytes(payload) == stdlib(payload)


@pytest.mark.parametrize("fields", [("only",), ("a", "b"), ("a", "b", "c")])
def test_csv_bytes_takes_mappings_and_sequences_alike_for_any_number_of_fields(fields: tuple[str, ...]) -> None:
    rows = [{name: f"{name}{i}" for name in fields} for i in range(3)]
    as_mappings = csv_bytes(fields, rows)
    assert as_mappings == csv_bytes(fields, [[row[name] for name in fields] for row in rows])
    assert as_mappings.decode().split("\r\n") == [",".join(fields),
                                                  *(",".join(f"{name}{i}" for name in fields) for i in range(3)), ""]
