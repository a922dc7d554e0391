"""Each downloaded results line is decoded as the standard json module would decode it, whichever decoder runs:
what the fast one refuses (a BOM, a lone surrogate, NaN) is read all the same, and a line that is not JSON names
its batch and line. (One difference is left: an integer beyond 64 bits comes as the nearest float; no count or
token figure of a provider comes near one.)"""

from __future__ import annotations

import json

import pytest

from hipbatch.collect import Check
from hipbatch.errors import UnreadableResults
from hipbatch.records import BatchInfo

LINES = [
    b'{"custom_id": "a", "response": {"body": {"text": "plain \\u00e9 \xc3\xa9"}}}',
    b'\xef\xbb\xbf{"custom_id": "b", "response": null}',  # a leading BOM
    b'{"custom_id": "c", "response": {"body": {"text": "half an emoji \\ud83d"}}}',  # a lone surrogate
    b'{"custom_id": "d", "usage": {"total_tokens": 18446744073709551615, "n": -9223372036854775808}}',
    b'{"custom_id": "e", "score": NaN, "other": 1.5e300}',
    b'  {"custom_id": "f", "x": [1, 2.25, true, false, null]}  \n',
]


@pytest.mark.parametrize("raw", LINES)
def test_a_line_decodes_as_json_would(raw: bytes) -> None:
    check = Check(BatchInfo(id="batch_1", status="completed", is_final=True))
    expected = json.loads(raw.strip().decode("utf-8-sig"))
    got = check.line(7, raw)
    assert got == expected or (json.dumps(got) == json.dumps(expected))  # NaN != NaN: compared as text
    assert check.count == 1


@pytest.mark.parametrize(
    "raw", [b'{"custom_id": "a", ', b'{"custom_id": "a"} trailing', b'{"custom_id": "\xff\xfe"}', b"[1, 2"]
)
def test_a_line_that_is_not_json_names_the_batch_and_the_line(raw: bytes) -> None:
    check = Check(BatchInfo(id="batch_9", status="completed", is_final=True))
    with pytest.raises(UnreadableResults, match="batch batch_9: results line 12 is not valid JSON"):
        check.line(12, raw)
    assert check.count == 0
