"""SMTP smuggling and the end of the data (RFC 5321 sections 2.3.8, 4.1.1.4,
4.5.2, 4.5.3.1.6).

The end of the mail data is CR LF . CR LF and nothing else.  A message
holding a bare CR, a bare LF or a NUL is refused after its real end with
550 5.5.2, the session goes on, and nothing the proxy forwards may end the
data early for a lax upstream (RawUpstream reads any line "." ended by LF
as the end, as Postfix before 3.9 did).
"""

import re
import select
import smtplib
import socket
import time

import pytest

import smtpproxy
from conftest import (ProxyFactory, RawUpstream, Upstream, open_transaction,
                      wait_until)

SENDER = "sender@example.com"
RECIPIENT = "rcpt@example.org"

PREFIX = b"Subject: t\r\n\r\nfirst"
SMUGGLED = (b"MAIL FROM:<evil@attacker.example>\r\n"
            b"RCPT TO:<victim@example.org>\r\n"
            b"DATA\r\n"
            b"\r\n"
            b"smuggled\r\n")
END = b"\r\n.\r\n"

SEQUENCES = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n\x00.\r\n", id="CRLF-NUL.CRLF"),
    pytest.param(b"\n", id="bare-LF"),
    pytest.param(b"\r", id="bare-CR"),
    pytest.param(b" \x00 ", id="NUL-mid-line"),
]

# 78 kB of clean lines: more than the proxy's 64 kB chunk, so that part of
# the message has really been streamed upstream before the bad sequence.
PADDING = b"".join(b"padding line %05d " % i + b"x" * 56 + b"\r\n"
                   for i in range(1000))


def smuggling_message(sequence, padding=b""):
    return (b"Subject: t\r\n\r\n" + padding + b"first" + sequence + SMUGGLED
            + END)


def assert_refused_as_smuggling(reply):
    code, text = reply
    assert code == 550, reply
    assert text.startswith("5.5.2 "), reply
    assert re.search(r"bare\s*<?(LF|CR)>?|NUL", text), reply


def assert_noop_reply(reply):
    """The reply of our NOOP (250 2.0.0), not that of some smuggled MAIL
    (250 2.1.0) or RCPT (250 2.1.5)."""
    code, text = reply
    assert code == 250, reply
    assert text.startswith("2.0.0"), reply


def assert_silent(client, seconds=0.15):
    readable, _, _ = select.select([client.sock], [], [], seconds)
    assert not readable, "the proxy replied before the end of the data"


def assert_nothing_ends_data_for_a_lax_reader(raw):
    """No byte sequence in ``raw`` lets a lax reader end the data."""
    assert b"\x00" not in raw
    assert re.search(b"(?<!\r)\n", raw) is None, "bare LF forwarded"
    assert re.search(b"\r(?!\n)", raw) is None, "bare CR forwarded"
    for end in (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r\n"):
        assert end not in raw, "%r forwarded" % end
    assert not raw.startswith(b".\r") and not raw.startswith(b".\n")


def smuggled_commands(commands):
    return [c for c in commands if b"evil@" in c or b"victim@" in c]


# ---------------------------------------------------------------------------
# Shared servers: the same upstream and proxy serve the many parametrized
# cases (the conftest fixtures cost half a second each to shut down).  Each
# test starts from empty records.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict_servers():
    server = Upstream()
    factory = ProxyFactory(server)
    port = factory()
    yield server, port, factory
    factory.stop()
    server.stop()


def fresh(server, factory):
    """Wait until the previous test's sessions have ended, and close the
    upstream sessions they left for the next client: each test starts
    with none."""
    factory.wait_idle()
    smtpproxy.upstream_pool.reset()
    wait_until(lambda: server.open_connections == 0,
               what="the previous test's upstream sessions to end")


@pytest.fixture
def strict(strict_servers):
    """``(upstream, proxy port)``: aiosmtpd behind a default proxy."""
    server, port, factory = strict_servers
    fresh(server, factory)
    del server.handler.messages[:]
    del server.handler.commands[:]
    return server, port


@pytest.fixture(scope="module")
def lax_servers():
    server = RawUpstream()
    factory = ProxyFactory(server)
    port = factory()
    yield server, port
    factory.stop()
    server.stop()


@pytest.fixture
def lax(lax_servers):
    """``(raw upstream, proxy port)``: the lax RawUpstream behind a proxy."""
    server, port = lax_servers
    del server.raw[:]
    del server.messages[:]
    del server.commands[:]
    return server, port


# ---------------------------------------------------------------------------
# Smuggling sequences against a strict upstream (aiosmtpd)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sequence", SEQUENCES)
def test_smuggling_sequence_refused_after_real_end(strict, client_factory,
                                                   sequence):
    upstream, port = strict
    client = client_factory(port)
    open_transaction(client)
    # The message, its real end and a pipelined NOOP in one write.
    client.send(smuggling_message(sequence) + b"NOOP\r\n")
    assert_refused_as_smuggling(client.reply())
    # Exactly one reply for the message: the next one is our NOOP's.
    assert_noop_reply(client.reply())
    # The session goes on.
    assert_noop_reply(client.cmd("NOOP"))
    assert client.cmd("QUIT")[0] == 221
    assert client.is_closed()
    assert upstream.messages == []
    assert not [c for c in upstream.handler.commands
                if "evil@" in str(c) or "victim@" in str(c)]


# ---------------------------------------------------------------------------
# Smuggling sequences against a lax upstream (RawUpstream)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [b"", PADDING], ids=["short", "streamed"])
@pytest.mark.parametrize("sequence", SEQUENCES)
def test_smuggling_sequence_never_reaches_lax_upstream(
        lax, client_factory, sequence, padding):
    raw_upstream, port = lax
    client = client_factory(port)
    open_transaction(client)
    message = smuggling_message(sequence, padding)
    body, end = message[:-len(END)], message[-len(END):]
    if padding:
        # The proxy streams the message upstream (its documented design):
        # let a clean part of it reach the upstream before the bad bytes.
        head = b"Subject: t\r\n\r\n" + padding
        assert body.startswith(head)
        client.send(head)
        wait_until(lambda: raw_upstream.raw, timeout=5,
                   what="the start of the message upstream")
        body = body[len(head):]
    client.send(body)
    # Nothing is answered before the real end of the data.
    assert_silent(client)
    client.send(end + b"NOOP\r\n")
    assert_refused_as_smuggling(client.reply())
    assert_noop_reply(client.reply())

    # A clean message on the same connection is delivered afterwards, so
    # the lax upstream has finished reading the first session.
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<%s>" % RECIPIENT)[0] == 250
    assert client.cmd("DATA")[0] == 354
    clean = b"Subject: clean\r\n\r\nclean body\r\n"
    client.send(clean + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert client.cmd("QUIT")[0] == 221

    assert raw_upstream.messages == [clean]
    assert smuggled_commands(raw_upstream.commands) == []
    raw = b"".join(raw_upstream.raw)
    clean_raw = clean + b".\r\n"
    assert raw.endswith(clean_raw)
    refused_raw = raw[:-len(clean_raw)]
    assert_nothing_ends_data_for_a_lax_reader(refused_raw)
    if padding:
        # What was forwarded is clean padding only.
        assert refused_raw
        assert (b"Subject: t\r\n\r\n" + PADDING).startswith(refused_raw)


# ---------------------------------------------------------------------------
# The end of the data, and the bad sequences, split across TCP segments
# ---------------------------------------------------------------------------

LONG = b"x" * 1500

SPLIT_CASES = [
    pytest.param([b"Subject: s\r\n\r\nabc\r\n", b".", b"\r", b"\n"], 250,
                 id="end-in-pieces"),
    pytest.param([b"Subject: s\r\n\r\nabc\r", b"\n.\r", b"\n"], 250,
                 id="end-CR|LF.CR|LF"),
    pytest.param([PREFIX, b"\n", b".", b"\n", SMUGGLED, b"\r\n", b".",
                  b"\r\n"], 550, id="LF.LF-in-pieces"),
    pytest.param([PREFIX + b"\r", b"\n.", b"\r", SMUGGLED, END], 550,
                 id="CRLF.CR-in-pieces"),
    pytest.param([PREFIX + b"\r", b".\r\n", SMUGGLED, END], 550,
                 id="CR|.CRLF"),
    # An overlong line whose CR LF straddles two segments, then the end.
    pytest.param([b"Subject: s\r\n\r\n", LONG + b"\r", b"\n.\r\n"], 552,
                 id="long-line-CR|LF.CRLF"),
    # A "." in the middle of an overlong line is not the end.
    pytest.param([b"Subject: s\r\n\r\n", LONG, b".\r\n", b"more\r\n.\r\n"],
                 552, id="long-line|.CRLF"),
    # Overlong and ended by a bare LF: either refusal will do.
    pytest.param([b"Subject: s\r\n\r\n", LONG + b"\n", b".\r\n",
                  b"more\r\n.\r\n"], (550, 552), id="long-line-LF|.CRLF"),
]


@pytest.mark.parametrize("pieces, expected", SPLIT_CASES)
def test_end_of_data_across_segments(strict, client_factory, pieces,
                                     expected):
    upstream, port = strict
    client = client_factory(port, timeout=5)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    open_transaction(client)
    for piece in pieces[:-1]:
        client.send(piece)
        time.sleep(0.02)
    client.send(pieces[-1] + b"NOOP\r\n")
    code, text = client.reply()
    if isinstance(expected, tuple):
        assert code in expected, (code, text)
    else:
        assert code == expected, (code, text)
    assert_noop_reply(client.reply())
    assert client.cmd("QUIT")[0] == 221
    message = b"".join(pieces)
    if expected == 250:
        assert [m.content for m in upstream.messages] == [
            message[:-len(b".\r\n")]]
    else:
        assert upstream.messages == []
        assert not [c for c in upstream.handler.commands
                    if "evil@" in str(c) or "victim@" in str(c)]


# ---------------------------------------------------------------------------
# Dot-stuffing is forwarded untouched
# ---------------------------------------------------------------------------

DOTTED_BODY = (b"Subject: dots\r\n"
               b"\r\n"
               b".leading dot\r\n"
               b"..two dots\r\n"
               b".\r\n"
               b"not the end\r\n"
               b". space\r\n"
               b"...\r\n"
               b"last\r\n")


def stuff(body):
    return re.sub(b"(?m)^\\.", b"..", body)


def test_dot_stuffed_message_arrives_identical(strict):
    upstream, port = strict
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        refused = smtp.sendmail(SENDER, [RECIPIENT], DOTTED_BODY)
    assert refused == {}
    assert len(upstream.messages) == 1
    message = upstream.messages[0]
    assert message.mail_from == SENDER
    assert message.rcpt_tos == [RECIPIENT]
    # aiosmtpd un-stuffs: a proxy that un-stuffed too would lose a dot.
    assert message.content == DOTTED_BODY


def test_dot_stuffed_bytes_forwarded_exactly(lax, client_factory):
    raw_upstream, port = lax
    client = client_factory(port)
    open_transaction(client)
    stuffed = stuff(DOTTED_BODY)
    assert stuffed.count(b"\r\n..") == 5        # the test really stuffs
    client.send(stuffed + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert client.cmd("QUIT")[0] == 221
    assert b"".join(raw_upstream.raw) == stuffed + b".\r\n"
    assert raw_upstream.messages == [stuffed]


# ---------------------------------------------------------------------------
# Line length (RFC 5321 section 4.5.3.1.6: 1000 octets with the CRLF)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1001, 1002, 5000])
def test_line_over_1000_octets_refused(strict, client_factory, length):
    upstream, port = strict
    client = client_factory(port)
    open_transaction(client)
    long_line = b"x" * (length - 2) + b"\r\n"
    assert len(long_line) == length
    client.send(b"Subject: long\r\n\r\n" + long_line + b"after\r\n")
    assert_silent(client)
    client.send(b".\r\n")
    code, text = client.reply()
    assert code == 552, (code, text)
    assert text.startswith("5.5.6"), text
    assert_noop_reply(client.cmd("NOOP"))
    assert client.cmd("QUIT")[0] == 221
    assert upstream.messages == []


def test_line_of_exactly_1000_octets_accepted(strict, client_factory):
    upstream, port = strict
    client = client_factory(port)
    open_transaction(client)
    line = b"y" * 998 + b"\r\n"
    body = b"Subject: long\r\n\r\n" + line + b"after\r\n"
    client.send(body + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert client.cmd("QUIT")[0] == 221
    assert len(upstream.messages) == 1
    assert upstream.messages[0].content == body


@pytest.mark.parametrize("split", [False, True])
def test_line_of_1000_octets_after_its_transparency_dot_accepted(
        strict, client_factory, split):
    # RFC 5321 section 4.5.3.1.6: 1000 octets with the CRLF, "not
    # counting the leading dot duplicated for transparency": 1001 on the
    # wire.  With ``split``, the line arrives without its LF first.
    upstream, port = strict
    client = client_factory(port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    open_transaction(client)
    line = b"." + b"." + b"a" * 997 + b"\r\n"
    assert len(line) == 1000 + 1
    head = b"Subject: long\r\n\r\n"
    if split:
        client.send(head + line[:-1])
        assert_silent(client)
        client.send(b"\n.\r\n")
    else:
        client.send(head + line + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    # One more octet is one too many.
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<%s>" % RECIPIENT)[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(head + b"." + b"." + b"a" * 998 + b"\r\n.\r\n")
    assert client.reply()[0] == 552
    assert client.cmd("QUIT")[0] == 221
    assert len(upstream.messages) == 1
    assert upstream.messages[0].content == head + line[1:]


# ---------------------------------------------------------------------------
# Message size
# ---------------------------------------------------------------------------

def test_message_over_max_size_refused_session_continues(proxy, upstream,
                                                          client_factory):
    client = client_factory(proxy(max_message_size=10000))
    open_transaction(client)
    big = b"Subject: big\r\n\r\n" + (b"z" * 78 + b"\r\n") * 200
    assert len(big) > 10000
    client.send(big + b".\r\n")
    code, text = client.reply()
    assert code == 552, (code, text)
    assert text.startswith("5.3.4"), text
    assert upstream.messages == []

    # The session continues: a small message is delivered.
    assert client.cmd("MAIL FROM:<%s>" % SENDER)[0] == 250
    assert client.cmd("RCPT TO:<%s>" % RECIPIENT)[0] == 250
    assert client.cmd("DATA")[0] == 354
    small = b"Subject: small\r\n\r\nsmall body\r\n"
    client.send(small + b".\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert client.cmd("QUIT")[0] == 221
    assert len(upstream.messages) == 1
    assert upstream.messages[0].content == small


# ---------------------------------------------------------------------------
# The client goes away or falls silent in the middle of the data
# ---------------------------------------------------------------------------

def test_client_disconnect_mid_data_delivers_nothing(proxy, upstream,
                                                     client_factory):
    client = client_factory(proxy())
    open_transaction(client)
    assert upstream.open_connections == 1
    # More than one 64 kB chunk, so that part of it went upstream.
    client.send(b"Subject: half\r\n\r\n" + PADDING + b"half a li")
    client.close()
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream connection to be closed")
    assert upstream.connections == 1
    assert upstream.messages == []


def test_client_silent_mid_data_times_out(proxy, upstream, client_factory):
    client = client_factory(proxy(inactivity_timeout=1))
    open_transaction(client)
    client.send(b"Subject: silent\r\n\r\nhalf a message\r\n")
    code, text = client.reply()
    assert code == 421, (code, text)
    assert text.startswith("4.4.2"), text
    assert client.is_closed()
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream connection to be closed")
    assert upstream.messages == []
