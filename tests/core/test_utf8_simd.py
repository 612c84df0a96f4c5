"""
The C UTF-8 check's SIMD blocks (``_utf8.c``: AVX2, SSSE3) against its scalar state machine and
against CPython's own decoder: the same state for every input, masked or not, whole or fed in
pieces, at every window of a buffer (so nothing outside ``data[start:end]`` is read as text).
"""

from __future__ import annotations

import codecs
import ctypes
import mmap
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsgate.core.frames import xor_mask

_utf8 = pytest.importorskip("wsgate.core._utf8")

PATHS: tuple[str, ...] = _utf8.PATHS
SIMD_PATHS = [p for p in PATHS if p != "scalar"]
KEYS = [None, b"\x9a\x51\x0c\xe7", b"\xff\xff\xff\xff", b"\x00\x80\xc0\xf0"]
ACCEPT, REJECT = 0, 8

# after this lead byte, alone: the scalar machine's state (see the enum in _utf8.c)
FIRST_STATE = {0xE0: 4, 0xED: 5, 0xF0: 6, 0xF4: 7}
# bytes that break UTF-8, or nearly: surrogates, overlongs, above U+10FFFF, never-used bytes,
# stray continuations, and good characters of every length (to cut or misplace)
NASTY = [
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xed\x9f\xbf",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xc2\x80",
    b"\xe0\x80\x80",
    b"\xe0\x9f\xbf",
    b"\xe0\xa0\x80",
    b"\xf0\x80\x80\x80",
    b"\xf0\x8f\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xf8",
    b"\xfe",
    b"\xff",
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xff\xbf",
    b"\x80",
    b"\xbf",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    "é".encode(),
    "€".encode(),
    "\U0001f600".encode(),
    "\U0010ffff".encode(),
    b"\x00",
    b"\x7f",
]


def python_state(plain: bytes) -> int:
    """The state after ``plain`` by CPython's incremental decoder (the scalar machine's states)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(plain, False)
    except UnicodeDecodeError:
        return REJECT
    pending = decoder.getstate()[0]
    if not pending:
        return ACCEPT
    lead = pending[0]
    if len(pending) >= 2 and lead == 0xED and pending[1] >= 0xA0:
        return REJECT  # a surrogate: the decoder waits for a third byte to refuse it
    if len(pending) == 1 and lead in FIRST_STATE:
        return FIRST_STATE[lead]
    size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return size - len(pending)


def check_all(data: bytes, start: int, end: int, key: bytes | None, offset: int, state: int) -> int:
    """The state every path returns, asserting they agree; check() must be the best path."""
    want = _utf8.check_using("scalar", data, start, end, key, offset, state)
    for path in SIMD_PATHS:
        got = _utf8.check_using(path, data, start, end, key, offset, state)
        assert got == want, (path, data[start:end], key, offset, state)
    assert _utf8.check(data, start, end, key, offset, state) == want
    return want


def expect(plain: bytes, key: bytes | None = None, offset: int = 0) -> None:
    """``plain`` masked with ``key`` at ``offset``: every path gives CPython's verdict."""
    data = xor_mask(plain, key, offset)
    state = check_all(data, 0, len(data), key, offset, ACCEPT)
    assert state == python_state(plain), (plain, key, offset)
    try:
        plain.decode("utf-8")
    except UnicodeDecodeError:
        assert state != ACCEPT
    else:
        assert state == ACCEPT


def expect_pieces(plain: bytes, cuts: list[int], key: bytes | None) -> None:
    """``plain`` masked, fed in pieces cut at ``cuts``, the state carried: the same end state."""
    data = xor_mask(plain, key)
    bounds = sorted({0, len(data), *(c for c in cuts if 0 <= c <= len(data))})
    state = {path: ACCEPT for path in PATHS}
    for a, b in zip(bounds, bounds[1:], strict=False):
        for path in PATHS:
            state[path] = _utf8.check_using(path, data, a, b, key, a, state[path])
        assert len(set(state.values())) == 1, (plain, bounds, key, state)
    assert state["scalar"] == python_state(plain)


def expect_windows(plain: bytes, key: bytes | None, step: int = 1) -> None:
    """Every window ``data[start:end]`` of the masked buffer, from state 0."""
    data = xor_mask(plain, key)
    for start in range(0, len(data) + 1, step):
        for end in range(start, len(data) + 1, step):
            state = check_all(data, start, end, key, start, ACCEPT)
            assert state == python_state(plain[start:end]), (plain, start, end, key)


def test_paths() -> None:
    assert PATHS[0] == "scalar" and _utf8.PATH == PATHS[-1]
    with pytest.raises(ValueError):
        _utf8.check_using("mmx", b"", 0, 0, None, 0, 0)
    with pytest.raises(TypeError):
        _utf8.check_using("scalar", b"", 0, 0, None, 0)


def test_python_state_oracle() -> None:
    assert python_state(b"") == 0 and python_state("é€😀".encode()) == 0
    assert [python_state(b) for b in (b"\xc3", b"\xe0", b"\xe0\xa0", b"\xed", b"\xe2")] == [
        1,
        4,
        1,
        5,
        2,
    ]
    assert [python_state(b) for b in (b"\xf0", b"\xf0\x90", b"\xf4", b"\xf1\x80\x80")] == [
        6,
        2,
        7,
        1,
    ]
    assert python_state(b"\xed\xa0") == python_state(b"\xf4\x90") == python_state(b"\x80") == 8


@pytest.mark.parametrize("background", ["a", "é", "€", "😀", "aé€😀"])
@pytest.mark.parametrize("key", KEYS[:2], ids=["plain", "masked"])
def test_every_nasty_sequence_at_every_place(background: str, key: bytes | None) -> None:
    """Each nasty sequence at each place across three blocks, and the text cut after it."""
    text = (background * 200).encode()[:120]
    text = text.decode("utf-8", "ignore").encode()
    for bad in NASTY:
        for at in range(0, 100):
            for offset in range(4):
                plain = text[:at] + bad + text[at:]
                expect(plain, key, offset)
                expect(plain[: at + len(bad)], key, offset)
                expect(plain[: at + len(bad) - 1], key, offset)


def test_every_lead_with_every_second_byte() -> None:
    """Each byte C0..FF, then each continuation byte and as many more as its length asks for."""
    for lead in range(0xC0, 0x100):
        size = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        for second in range(0x80, 0xC0):
            seq = bytes([lead, second]) + b"\x80" * (size - 2)
            for at in (35, 46, 61, 62, 63, 64):
                plain = b"a" * at + seq + b"b" * 40
                expect(plain)
                expect(plain[: at + size], KEYS[1], at & 3)


@pytest.mark.parametrize("char", ["é", "€", "😀", "\U0010ffff", "\ud7ff", "\ue000"])
def test_characters_cut_by_the_end_at_every_length(char: str) -> None:
    for background in ("a", "é"):
        text = (background * 80 + char * 40).encode()
        for end in range(len(text) + 1):
            for offset in range(4):
                expect(text[:end], KEYS[1], offset)
                expect(text[:end])


def test_ascii_block_after_a_lead_at_the_end_of_a_block() -> None:
    """An all-ASCII block right after a block ending inside a character."""
    leads = [b"\xc3", b"\xe2", b"\xe2\x82", b"\xf0", b"\xf0\x9f", b"\xf0\x9f\x98", b"\xed"]
    leads += [b"\xc0", b"\xc1", b"\xf4", b"\xf5", b"\xff", b"\x80", b"\xc3\xa9"]
    for lead in leads:
        for block_end in (16, 32, 48, 64, 96):
            for prefix in range(0, 5):
                head = b"x" * prefix + "é".encode() * 4
                head += b"y" * (block_end + prefix - len(head) - len(lead))
                for plain in (head + lead + b"z" * 70, head + lead + "é".encode() * 40):
                    for key in KEYS:
                        for offset in range(4):
                            expect(plain, key, offset)


def test_windows_never_read_outside() -> None:
    """Leads just before a window, continuations just after it: only the window counts."""
    rng = random.Random(6455)
    pool = ["a", "é", "€", "😀", "\x00", "Ω"]
    for _ in range(12):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(20, 60))).encode()
        plain = b"\xf0\xe0\xc3" + text + b"\xf0\x9f"
        for key in KEYS[:2]:
            expect_windows(plain, key)


@pytest.mark.skipif(sys.platform != "linux", reason="guard pages by mprotect")
def test_no_read_outside_the_buffer() -> None:
    """Text flush against unreadable pages on both sides: a read past either end would crash."""
    page, no_access = mmap.PAGESIZE, 0
    area = mmap.mmap(-1, 3 * page)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    anchor = ctypes.c_char.from_buffer(area)
    base = ctypes.addressof(anchor)
    assert libc.mprotect(base, page, no_access) == 0
    assert libc.mprotect(base + 2 * page, page, no_access) == 0
    view = memoryview(area)[page : 2 * page]
    try:
        rng = random.Random(3)
        for _ in range(300):
            plain = "".join(rng.choice("aé€😀") for _ in range(rng.randrange(1, 200))).encode()
            plain = corrupt(plain, rng)
            key = rng.choice(KEYS)
            data = xor_mask(plain, key)
            n = len(data)
            for at in (0, page - n):  # at the start of the page, and at its end
                view[at : at + n] = data
                assert check_all(view, at, at + n, key, 0, ACCEPT) == python_state(plain)
                for cut in range(0, n, 7):
                    state = check_all(view, at, at + cut, key, 0, ACCEPT)
                    state = check_all(view, at + cut, at + n, key, cut, state)
                    assert state == python_state(plain)
    finally:
        assert libc.mprotect(base, 3 * page, mmap.PROT_READ | mmap.PROT_WRITE) == 0
        view.release()
        del anchor
        area.close()


def test_random_fuzz() -> None:
    rng = random.Random(20240601)
    pool = ["a", "b", " ", '"', "é", "ß", "€", "中", "😀", "\U0010ffff", "\ud7ff", "\ue000"]
    for round_ in range(20000):
        length = rng.randrange(0, 300)
        if round_ % 3 == 0:
            plain = bytes(rng.randrange(256) for _ in range(length))
        else:
            plain = "".join(rng.choice(pool) for _ in range(length // 2)).encode()
            plain = corrupt(plain, rng)
        key = rng.choice(KEYS + [rng.randbytes(4)])
        expect(plain, key, rng.randrange(4))
        cuts = [rng.randrange(len(plain) + 1) for _ in range(rng.randrange(0, 8))]
        expect_pieces(plain, cuts, key)


def corrupt(plain: bytes, rng: random.Random) -> bytes:
    """A few random edits (often none): flips, inserts, deletes, nasty sequences."""
    data = bytearray(plain)
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        at = rng.randrange(len(data) + 1)
        what = rng.randrange(4)
        if what == 0 and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif what == 1:
            data[at:at] = bytes([rng.randrange(256)])
        elif what == 2 and at < len(data):
            del data[at]
        else:
            data[at:at] = rng.choice(NASTY)
    return bytes(data)


def test_big_messages() -> None:
    """64 KiB of text of each kind, valid, then broken or cut near the start, middle and end."""
    rng = random.Random(7)
    json = '{"user":"José","price":"12,50 €","city":"Málaga","msg":"déjà vu 😀"},'
    for sample in ("a", "αβγδ", json, "日本語", "😀", "aé"):
        text = (sample * 65536).encode()[:65536].decode("utf-8", "ignore").encode()
        for key in KEYS[:2]:
            expect(text, key, 1)
            expect(text[:-1], key, 0)
            for at in (0, 1, 31, 32, 33, 4095, 32768, 65500, len(text) - 3, len(text) - 1):
                bad = rng.choice(NASTY[:20])
                expect(text[:at] + bad + text[at:], key, rng.randrange(4))
            cuts = sorted(rng.randrange(len(text)) for _ in range(20))
            expect_pieces(text, cuts, key)
            expect_pieces(text[:1000] + b"\xed\xa0\x80" + text[1000:], cuts, key)


nasty = st.sampled_from(NASTY)
edits = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "nasty"]), st.integers(0, 10**6), nasty),
    max_size=3,
)
keys = st.one_of(st.none(), st.binary(min_size=4, max_size=4))
SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def apply(plain: bytes, changes: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(plain)
    for what, where, bad in changes:
        at = where % (len(data) + 1)
        if what == "flip" and at < len(data):
            data[at] ^= 1 << (where % 8)
        elif what == "insert":
            data[at:at] = bytes([where % 256])
        elif what == "delete" and at < len(data):
            del data[at]
        elif what == "nasty":
            data[at:at] = bad
    return bytes(data)


@SETTINGS
@given(st.binary(max_size=300), keys, st.integers(0, 3))
def test_random_bytes(plain: bytes, key: bytes | None, offset: int) -> None:
    expect(plain, key, offset)


@SETTINGS
@given(st.text(max_size=150), edits, keys, st.integers(0, 3))
def test_text_with_corruptions(text: str, changes: list, key: bytes | None, offset: int) -> None:
    plain = apply(text.encode("utf-8", "surrogatepass"), changes)
    expect(plain, key, offset)


@SETTINGS
@given(
    st.text(st.characters(codec="utf-8"), min_size=10, max_size=150),
    edits,
    keys,
    st.lists(st.integers(0, 600), max_size=10),
)
def test_text_in_pieces(text: str, changes: list, key: bytes | None, cuts: list[int]) -> None:
    plain = apply(text.encode(), changes)
    expect_pieces(plain, cuts, key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=10, max_size=40), edits, keys)
def test_text_every_window(text: str, changes: list, key: bytes | None) -> None:
    plain = apply(text.encode("utf-8", "surrogatepass"), changes)
    expect_windows(plain, key)
