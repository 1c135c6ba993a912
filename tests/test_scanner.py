"""DataScanner on its own: the end of the data and SMTP smuggling, with
no socket, fed every way a network can split the bytes."""

import itertools

import pytest

from smtpproxy import DataScanner

BODY = b"Subject: s\r\n\r\nline one\r\n..dot-stuffed\r\nlast\r\n"


def scan(pieces, max_line=1000, max_size=10000):
    """Feed ``pieces`` until the end, as the reader would; return the
    scanner, what it forwarded, and what follows the end (its leftover
    and the pieces never fed)."""
    scanner = DataScanner(max_line, max_size)
    forwarded = []
    for number, piece in enumerate(pieces):
        forwarded.append(scanner.feed(piece))
        if scanner.ended:
            scanner.after = scanner.leftover + b"".join(pieces[number + 1:])
            break
    return scanner, b"".join(forwarded)


def splits(data, cuts=2):
    """``data`` cut at every position, and at every pair of positions."""
    yield [data]
    for n in range(1, cuts + 1):
        for points in itertools.combinations(range(1, len(data)), n):
            bounds = (0,) + points + (len(data),)
            yield [data[a:b] for a, b in zip(bounds, bounds[1:])]


# (the bytes after DATA's CR LF, the refusal expected or None, what
# follows the end)
CASES = [
    pytest.param(BODY + b".\r\nQUIT\r\n", None, b"QUIT\r\n", id="clean"),
    pytest.param(b".\r\nNOOP\r\n", None, b"NOOP\r\n", id="empty-message"),
    pytest.param(b"a\r\n.\nX\r\n.\r\n", "550 5.5.2 Error: bare <LF>", b"",
                 id="CRLF.LF"),
    pytest.param(b"a\n.\r\nX\r\n.\r\n", "550 5.5.2 Error: bare <LF>", b"",
                 id="LF.CRLF"),
    pytest.param(b"a\n.\nX\r\n.\r\n", "550 5.5.2 Error: bare <LF>", b"",
                 id="LF.LF"),
    pytest.param(b"a\r\n.\rX\r\n.\r\n", "550 5.5.2 Error: bare <CR>", b"",
                 id="CRLF.CR"),
    pytest.param(b"a\r.\r\nX\r\n.\r\n", "550 5.5.2 Error: bare <CR>", b"",
                 id="CR.CRLF"),
    pytest.param(b"a\r.\rX\r\n.\r\n", "550 5.5.2 Error: bare <CR>", b"",
                 id="CR.CR"),
    pytest.param(b"a\x00b\r\n.\r\n", "550 5.5.2 Error: NUL", b"", id="NUL"),
]


@pytest.mark.parametrize("data, problem, after", CASES)
def test_the_end_and_the_refusal_do_not_depend_on_the_splits(data, problem,
                                                             after):
    for pieces in splits(data, cuts=2 if len(data) < 40 else 1):
        scanner, forwarded = scan(pieces)
        assert scanner.ended, pieces
        assert scanner.after == after, pieces
        if problem is None:
            assert scanner.problem is None, pieces
            assert forwarded == data[:len(data) - len(after) - 3], pieces
        else:
            assert scanner.problem.startswith(problem), pieces
            # Nothing from the bad line on went anywhere.
            assert b"X" not in forwarded, pieces


def test_a_smuggled_end_is_not_the_end():
    # What a lax server would take for the end is part of the message;
    # the real end comes later, and what follows it are commands.
    scanner, _ = scan([b"a\r\n.\nMAIL FROM:<evil@x>\r\n.\r\nRSET\r\n"])
    assert scanner.after == b"RSET\r\n"
    assert scanner.problem.startswith("550 5.5.2")


def test_line_length_counts_the_crlf_not_the_transparency_dot():
    ok = b"x" * 998 + b"\r\n"
    dotted = b"." + ok
    assert scan([ok + b".\r\n"])[0].problem is None
    assert scan([dotted + b".\r\n"])[0].problem is None
    for pieces in ([dotted[:-1], b"\n.\r\n"], [dotted[:700], dotted[700:],
                                               b".\r\n"]):
        assert scan(pieces)[0].problem is None, pieces
    too_long = b"x" + ok
    assert scan([too_long + b".\r\n"])[0].problem.startswith("552 5.5.6")
    assert scan([too_long[:600], too_long[600:] + b".\r\n"])[0] \
        .problem.startswith("552 5.5.6")


def test_an_overlong_line_split_anywhere_is_refused_and_its_end_found():
    line = b"y" * 1500 + b"\r\n"
    for cut in (1, 999, 1000, 1001, 1501, 1502):
        scanner, forwarded = scan([b"ok\r\n", line[:cut], line[cut:],
                                   b".\r\nQUIT\r\n"])
        assert scanner.problem.startswith("552 5.5.6"), cut
        assert scanner.after == b"QUIT\r\n", cut
        assert forwarded == b"ok\r\n", cut


def test_size_over_the_limit_is_refused_after_the_end():
    scanner, forwarded = scan([b"z" * 78 + b"\r\n"] * 200 + [b".\r\n"],
                              max_size=10000)
    assert scanner.ended
    assert scanner.problem == ("552 5.3.4 Message size exceeds fixed limit "
                               "of 10000 octets")
    assert len(forwarded) <= 10000


def test_an_endless_line_is_hopeless_past_twice_the_limit():
    scanner = DataScanner(1000, 10000)
    fed = 0
    while not scanner.hopeless:
        scanner.feed(b"q" * 4096)
        fed += 4096
        assert fed < 40000, "never gave up"
    assert 20000 < fed <= 20000 + 4096
    assert not scanner.ended
    assert scanner.problem.startswith("552 5.5.6")


def test_the_deadline_marks_follow_the_lines():
    scanner = DataScanner()
    scanner.feed(b"abc")
    assert scanner.mid_line and not scanner.new_line      # same line
    scanner.feed(b"def\r\nghi")
    assert scanner.mid_line and scanner.new_line          # a new one began
    scanner.feed(b"\r\n")
    assert not scanner.mid_line
    assert scanner.feed(b".\r\n") == b""
    assert scanner.ended and not scanner.mid_line
