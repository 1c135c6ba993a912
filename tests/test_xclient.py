"""XCLIENT and XFORWARD (issue 5) against a real Postfix smtpd (the
private instance of tests/postfix.py), which relays what it takes to the
aiosmtpd upstream: the Received: header Postfix writes, and its log, show
which client Postfix believed it talked to.

The test client connects from 127.0.0.2, the proxy from 127.0.0.1: an
upstream told the real client shows 127.0.0.2.
"""

import re

import pytest

from conftest import ProxyFactory, RawClient, wait_until
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
        [("ADDR", "IPV6:2001:db8::7"), ("HELO", "[UNAVAILABLE]")]) == \
        "ADDR=IPV6:2001:db8::7 HELO=[UNAVAILABLE]"
