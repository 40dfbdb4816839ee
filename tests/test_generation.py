"""Pure streaming logic: parameter validation, incremental decoding, stop strings."""

from __future__ import annotations

import pytest

from qwenvl_cli.errors import UsageError
from qwenvl_cli.generation import (Answer, Chunk, GenerationParams, IncrementalDecoder, StopText,
                                Timings, Usage, stats_line)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"max_tokens": 0}, "max_tokens must be a whole number of at least 1"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature must be between 0 and 2"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p must be above 0"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": -1}, "seed"),
    ({"stop": ("",)}, "stop sequences must be non-empty"),
    ({"stop": tuple(str(i) for i in range(17))}, "at most 16 stop sequences"),
])
def test_bad_params_are_usage_errors(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        GenerationParams(**kwargs).validated()


def test_good_params_pass_and_merge():
    params = GenerationParams(max_tokens=5, temperature=0.0, top_p=1.0, top_k=0, stop=("x",)).validated()
    merged = params.merged(max_tokens=9, temperature=None)
    assert merged.max_tokens == 9 and merged.temperature == 0.0 and merged.stop == ("x",)


# A toy byte-level "tokenizer": each id is one byte; invalid UTF-8 decodes to U+FFFD.
def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_equals_full_decode_and_holds_partial_utf8():
    text = "héllo 世界 ok"
    ids = list(text.encode())
    dec = IncrementalDecoder(decode)
    pieces = [dec.push([i]) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # the first byte of a 3-byte character yields nothing until the character completes
    first = list("世".encode())
    dec2 = IncrementalDecoder(decode)
    assert dec2.push(first[:1]) == "" and dec2.push(first[1:2]) == "" and dec2.push(first[2:]) == "世"


def test_incremental_decoder_flushes_a_truncated_sequence():
    dec = IncrementalDecoder(decode)
    assert dec.push(list(b"ab")) == "ab"
    assert dec.push([0xE4]) == ""
    assert dec.flush() == "\ufffd"  # what a full decode would show


def test_stop_text_cuts_before_the_stop_and_holds_possible_prefixes():
    stop = StopText(["END", "\n\n"])
    out = [stop.feed(t) for t in ["Hello E", "N", "D!", "more"]]
    assert "".join(out) == "Hello "
    assert out[0] == "Hello "  # "E" was held back: it might start END
    assert stop.stopped and stop.feed("x") == "" and stop.flush() == ""


def test_stop_text_releases_a_false_alarm():
    stop = StopText(["END"])
    assert stop.feed("the EN") == "the "
    assert stop.feed("TRY") == "ENTRY"
    assert stop.flush() == ""
    stop = StopText(["END"])
    assert stop.feed("ab E") == "ab " and stop.flush() == "E"


def test_stop_text_without_stops_passes_everything():
    stop = StopText([])
    assert stop.feed("abc") == "abc" and stop.flush() == ""


def test_stop_text_picks_the_earliest_of_several():
    stop = StopText(["zz", "b"])
    assert stop.feed("aabzz") == "aa"


def test_answer_collects_and_formats_stats():
    answer = Answer()
    for chunk in [Chunk("Hel"), Chunk("lo"), Chunk(finish_reason="stop", usage=Usage(10, 3),
                                                   timings=Timings(0.5, 1.0, 4.0))]:
        answer.add(chunk)
    assert answer.text == "Hello" and answer.finish_reason == "stop"
    assert answer.to_dict()["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert stats_line(answer) == ("10 prompt + 3 completion tokens, first token 0.50 s, 4.0 tokens/s, "
                                  "finish: stop")
