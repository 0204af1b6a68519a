"""Streaming text: split UTF-8 characters and stop strings across token boundaries."""

from llmgen.text import ContinuationText, find_stop


def byte_decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def feed(text: ContinuationText, data: bytes):
    out, stopped = [], False
    for b in data:
        delta, stopped = text.push(b)
        out.append(delta)
        if stopped:
            break
    out.append(text.flush())
    return out, stopped


def test_multibyte_characters_are_never_shown_half_done():
    pieces, _ = feed(ContinuationText(byte_decode), "café 日本".encode())
    assert "".join(pieces) == "café 日本"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    t = ContinuationText(byte_decode, stops=["END", "\n\n"])
    pieces, stopped = feed(t, b"hello ENDING")
    assert stopped and t.text == "hello " and "".join(pieces) == "hello "


def test_text_that_only_looks_like_a_stop_start_is_released():
    t = ContinuationText(byte_decode, stops=["END"])
    pieces, stopped = feed(t, b"an ENvelope")
    assert not stopped and "".join(pieces) == "an ENvelope"


def test_find_stop_picks_the_earliest():
    assert find_stop("abcXYdefAB", ["AB", "XY"]) == 3
    assert find_stop("abc", ["z"]) is None
