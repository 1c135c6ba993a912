"""XCLIENT and XFORWARD (issue 5) against a real Postfix smtpd (the
private instance of tests/postfix.py), which relays what it takes to the
aiosmtpd upstream: the Received: header Postfix writes, and its log, show
which client Postfix believed it talked to.

The test client connects from 127.0.0.2, the proxy from 127.0.0.1: an
upstream told the real client shows 127.0.0.2.
"""

import re

import pytest

from conftest import ProxyFactory, RawClient, RawUpstream, wait_until
import smtpproxy

MESSAGE = b"Subject: xclient\r\n\r\nHello.\r\n"
PROXY_HEADER = b"PROXY TCP4 192.0.2.7 192.0.2.1 40001 25\r\n"


def deliver_from(source, port, helo="client.example.net"):
    """Deliver one message from address ``source`` through the proxy."""
    client = RawClient(port, source=source, timeout=20)
    assert client.cmd("EHLO " + helo)[0] == 250
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE + b".\r\n")
    code, text = client.reply()
    client.cmd("QUIT")
    client.close()
    return code, text


def received_by_postfix(upstream):
    """The Received: header Postfix added, unfolded."""
    wait_until(lambda: upstream.messages, timeout=20,
               what="Postfix to relay the message")
    headers = upstream.messages[0].content.split(b"\r\n\r\n", 1)[0]
    headers = re.sub(rb"\r\n[ \t]+", b" ", headers).decode("ascii")
    return [line for line in headers.split("\r\n")
            if line.lower().startswith("received:")][0]


@pytest.fixture
def through_postfix(upstream, postfix_factory):
    """``(postfix, proxy port) = through_postfix(**options)``: the proxy
    in front of a Postfix that relays to ``upstream``."""
    factories = []

    def start(xclient=True, postfix_options=None, **attributes):
        server = postfix_factory(upstream.port, **(postfix_options or {}))
        factory = ProxyFactory(server)
        factories.append(factory)
        return server, factory(xclient=xclient, **attributes)
    yield start
    for factory in factories:
        factory.stop()


def test_xclient_makes_postfix_see_the_real_client(through_postfix,
                                                   upstream):
    postfix, port = through_postfix()
    code, text = deliver_from("127.0.0.2", port)
    assert code == 250
    received = received_by_postfix(upstream)
    assert "from client.example.net (unknown [127.0.0.2])" in received
    assert postfix.wait_for_log("client=unknown[127.0.0.2]")


def test_xclient_carries_a_proxy_protocol_address(through_postfix,
                                                  upstream):
    postfix, port = through_postfix(proxy_protocol="v1")
    client = RawClient(port, timeout=20, first=PROXY_HEADER)
    client.cmd("EHLO mx.sender.example")
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    client.cmd("DATA")
    client.send(MESSAGE + b".\r\n")
    assert client.reply()[0] == 250
    client.close()
    received = received_by_postfix(upstream)
    assert "from mx.sender.example (unknown [192.0.2.7])" in received
    # Postfix applied its own rules to that client: relaying elsewhere
    # would be refused to 192.0.2.7 (see tests/postfix.py).
    assert postfix.wait_for_log("client=unknown[192.0.2.7]")


def test_postfix_checks_the_real_client(through_postfix, upstream):
    """With XCLIENT, Postfix's relay rules apply to the real client: the
    proxy relays for it (AcceptAll), Postfix does not (it is not in
    mynetworks once named), and the client hears Postfix's refusal."""
    postfix, port = through_postfix(proxy_protocol="v1")
    client = RawClient(port, timeout=20, first=PROXY_HEADER)
    client.cmd("EHLO mx.sender.example")
    client.cmd("MAIL FROM:<a@example.net>")
    code, text = client.cmd("RCPT TO:<x@elsewhere.example>")
    assert code == 554 and "Relay access denied" in text
    client.close()


def test_without_xclient_postfix_sees_the_proxy(through_postfix, upstream):
    postfix, port = through_postfix(xclient=False)
    assert deliver_from("127.0.0.2", port)[0] == 250
    received = received_by_postfix(upstream)
    assert "[127.0.0.1]" in received and "127.0.0.2" not in received
    # Postfix counts the XCLIENT commands of a session in its disconnect
    # line ("xclient=0/1"): there were none.
    postfix.wait_for_log("disconnect from")
    assert "xclient=" not in postfix.log()


def test_an_upstream_that_does_not_offer_xclient_still_works(
        through_postfix, upstream):
    postfix, port = through_postfix(postfix_options={"xclient": False})
    assert deliver_from("127.0.0.2", port)[0] == 250
    received = received_by_postfix(upstream)
    assert "(unknown [127.0.0.1])" in received


def test_xforward_when_only_that_is_offered(through_postfix, upstream):
    postfix, port = through_postfix(postfix_options={"xclient": False,
                                                     "xforward": True})
    assert deliver_from("127.0.0.2", port)[0] == 250
    received_by_postfix(upstream)
    # XFORWARD changes Postfix's log, not its Received: header.
    assert postfix.wait_for_log("orig_client=unknown[127.0.0.2]")


def test_xclient_attributes_are_xtext():
    assert smtpproxy.xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert smtpproxy.format_xattributes(
        [("ADDR", "IPV6:2001:db8::7"), ("HELO", "[UNAVAILABLE]"),
         ("NAME", "a=b")]) == \
        "ADDR=IPV6:2001:db8::7 HELO=[UNAVAILABLE] NAME=a+3Db"


def test_xclient_gives_postfix_the_client_names(through_postfix, upstream):
    """NAME, the forward-confirmed name, and REVERSE_NAME reach Postfix as
    if it had looked them up itself (its Received: header shows NAME)."""
    postfix, port = through_postfix(**RESOLVER)
    assert deliver_from("127.0.0.2", port)[0] == 250
    received = received_by_postfix(upstream)
    assert ("from client.example.net (mx.sender.example [127.0.0.2])"
            in received)


def test_xclient_refused_defers_rather_than_pass_for_the_proxy(
        through_postfix, upstream, caplog):
    """A client that XCLIENT cannot name (an IPv6 address, which a Postfix
    with inet_protocols = ipv4 refuses) gets a 451: going on, Postfix
    would take it for the proxy, which is in its mynetworks."""
    postfix, port = through_postfix(proxy_protocol="v1")
    client = RawClient(port, timeout=20, first=(
        b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n"))
    client.cmd("EHLO mx.sender.example")
    client.cmd("MAIL FROM:<a@example.net>")
    code, text = client.cmd("RCPT TO:<x@elsewhere.example>")
    assert code == 451 and text.startswith("4.3.0 ")
    client.close()
    assert any("refused XCLIENT" in record.getMessage()
               for record in caplog.records)
    postfix.wait_for_log("disconnect from")
    assert "rcpt=" not in postfix.log()


# -- the commands, against a raw upstream that records them -------------------

RESOLVER = {
    "reverse_lookup": lambda self, address: ["Mx.Sender.Example."],
    "forward_lookup": lambda self, name: {"127.0.0.2"},
}
XCLIENT = "XCLIENT NAME ADDR PORT PROTO HELO REVERSE_NAME LOGIN"
XFORWARD = "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT"


@pytest.fixture
def recorder():
    """``(server, port) = recorder(ehlo lines, **proxy attributes)``: the
    proxy (xclient on) in front of a RawUpstream offering ``ehlo``."""
    servers, factories = [], []

    def start(ehlo, tls_context=None, **attributes):
        server = RawUpstream(ehlo, tls_context=tls_context)
        servers.append(server)
        factory = ProxyFactory(server)
        factories.append(factory)
        attributes.setdefault("xclient", True)
        return server, factory(**attributes)
    yield start
    for factory in factories:
        factory.stop()
    for server in servers:
        server.stop()


def envelope(port, helo="EHLO client+x.example", first=b""):
    """HELO/EHLO, MAIL and RCPT from 127.0.0.2; the source port and the
    RCPT's reply."""
    client = RawClient(port, source="127.0.0.2", first=first)
    assert client.cmd(helo)[0] == 250
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    reply = client.cmd("RCPT TO:<b@example.org>")
    source_port = client.sock.getsockname()[1]
    client.cmd("QUIT")
    client.close()
    return source_port, reply


def commands(server, count):
    wait_until(lambda: len(server.commands) >= count,
               what="%d commands upstream" % count)
    return [line.decode().rstrip("\r\n") for line in server.commands]


def test_xclient_before_the_envelope_then_the_clients_ehlo(recorder):
    server, port = recorder(["raw", "PIPELINING", XCLIENT, XFORWARD],
                            **RESOLVER)
    source_port, reply = envelope(port)
    assert reply[0] == 250
    assert commands(server, 5)[:5] == [
        "EHLO mail.example.com",
        "XCLIENT NAME=mx.sender.example ADDR=127.0.0.2 PORT=%d "
        "HELO=client+2Bx.example PROTO=ESMTP "
        "REVERSE_NAME=mx.sender.example" % source_port,
        "EHLO client+x.example",
        # No XFORWARD after XCLIENT: the session is the client's already.
        "MAIL FROM:<a@example.net>",
        "RCPT TO:<b@example.org>",
    ]


def test_xclient_for_a_helo_client_with_unconfirmed_names(recorder):
    server, port = recorder(
        ["raw", XCLIENT],
        reverse_lookup=lambda self, address: ["liar.example"],
        forward_lookup=lambda self, name: {"192.0.2.99"})
    source_port, reply = envelope(port, helo="HELO client.example.net")
    assert commands(server, 3)[:3] == [
        "EHLO mail.example.com",
        "XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.2 PORT=%d "
        "HELO=client.example.net PROTO=SMTP REVERSE_NAME=liar.example"
        % source_port,
        "HELO client.example.net",
    ]


def test_only_the_attributes_the_upstream_announces(recorder):
    server, port = recorder(["raw", "XCLIENT ADDR HELO"], **RESOLVER)
    envelope(port)
    assert commands(server, 2)[1] == \
        "XCLIENT ADDR=127.0.0.2 HELO=client+2Bx.example"


def test_the_client_attributes_hook_says_what_xclient_tells(recorder):
    """client_attributes() is a hook: what it returns is what XCLIENT
    tells the upstream, such as a LOGIN the upstream announced."""
    def client_attributes(self, command, announced=""):
        return smtpproxy.ConcreteMailHandler.client_attributes(
            self, command, "ADDR") + [("LOGIN", "alice")]
    server, port = recorder(["raw", XCLIENT],
                            client_attributes=client_attributes)
    envelope(port)
    assert commands(server, 2)[1] == "XCLIENT ADDR=127.0.0.2 LOGIN=alice"


def test_an_ipv6_client_is_named_in_xclient_form(recorder):
    server, port = recorder(["raw", "XCLIENT ADDR"], proxy_protocol="v1")
    envelope(port, first=b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 25\r\n")
    assert commands(server, 2)[1] == "XCLIENT ADDR=IPV6:2001:db8::7"


def test_a_refused_xclient_gives_451_and_no_envelope(recorder):
    server, port = recorder(["raw", XCLIENT])
    server.xclient_reply = b"550 5.7.0 Error: insufficient authorization\r\n"
    source_port, (code, text) = envelope(port)
    assert code == 451 and text.startswith("4.3.0 ")
    assert not any(line.startswith(b"MAIL") for line in server.commands)


def test_xforward_for_a_helo_client_too(recorder):
    """Postfix takes XFORWARD after a HELO as well: a HELO client is
    named in it, with PROTO=SMTP."""
    server, port = recorder(["raw", XFORWARD], **RESOLVER)
    source_port, reply = envelope(port, helo="HELO client.example.net")
    assert commands(server, 4)[:4] == [
        "EHLO mail.example.com",
        "HELO client.example.net",
        "XFORWARD NAME=mx.sender.example ADDR=127.0.0.2 PORT=%d "
        "HELO=client.example.net PROTO=SMTP SOURCE=REMOTE" % source_port,
        "MAIL FROM:<a@example.net>",
    ]


def test_xclient_travels_inside_the_upstream_tls(recorder, certificates):
    server, port = recorder(["raw", "STARTTLS", XCLIENT],
                            tls_context=certificates.server_context())
    envelope(port)
    assert server.tls_sessions == 1
    lines = commands(server, 4)
    assert lines[:2] == ["EHLO mail.example.com", "STARTTLS"]
    assert lines[2] == "EHLO mail.example.com"
    assert lines[3].startswith("XCLIENT ")


def test_replies_injected_before_the_upstream_tls_are_thrown_away(
        recorder, certificates):
    """A server (or a man in the middle) that pipelines replies after its
    220 to STARTTLS, in plain text, cannot have them read as replies in
    the TLS session (the upstream side of CVE-2021-38371)."""
    server, port = recorder(["raw", "PIPELINING", "STARTTLS"], xclient=False,
                            tls_context=certificates.server_context())
    server.after_starttls = (b"250 injected-1\r\n250 injected-2\r\n"
                             b"250 injected-3\r\n")
    source_port, (code, text) = envelope(port)
    assert (code, text) == (250, "ok")
    assert server.tls_sessions == 1


@pytest.mark.parametrize("ptr", ["two words.example", "mx\r\n.example",
                                 "192.0.2.1", "x" * 64 + ".example"])
def test_a_reverse_name_no_mail_server_takes_is_not_passed_on(recorder,
                                                             ptr):
    server, port = recorder(["raw", XCLIENT],
                            reverse_lookup=lambda self, address: [ptr],
                            forward_lookup=lambda self, name: {"127.0.0.2"})
    source_port, reply = envelope(port)
    assert reply[0] == 250
    assert commands(server, 2)[1] == (
        "XCLIENT NAME=[UNAVAILABLE] ADDR=127.0.0.2 PORT=%d "
        "HELO=client+2Bx.example PROTO=ESMTP REVERSE_NAME=[UNAVAILABLE]"
        % source_port)
