"""Self-tests of tests/postfix.py: a private, real Postfix that relays to
the aiosmtpd upstream and takes XCLIENT and XFORWARD from 127.0.0.1."""

import os
import smtplib

import pytest

import postfix
from conftest import processes_where, wait_until

MESSAGE = b"Subject: test\r\n\r\nHello.\r\n"


def received_headers(content):
    """The Received: headers of a message, each unfolded to one line."""
    headers = content.split(b"\r\n\r\n", 1)[0].decode("ascii")
    headers = headers.replace("\r\n\t", " ").replace("\r\n ", " ")
    return [line for line in headers.split("\r\n")
            if line.lower().startswith("received:")]


def session_processes(sid):
    """The pids of the processes (zombies too) of session ``sid``."""
    return processes_where(3, sid)


def test_xclient_sets_the_client_address(upstream, postfix_factory):
    server = postfix_factory(upstream.port)
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    smtp.ehlo("proxy.example")
    assert smtp.has_extn("xclient")
    assert smtp.has_extn("xforward")
    code, text = smtp.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=[UNAVAILABLE]"
                            " HELO=client.example.net PROTO=ESMTP")
    assert code == 220, text
    smtp.ehlo("client.example.net")
    # XCLIENT is authorized for the real peer, but Postfix now judges by
    # 192.0.2.7, which is not authorized: no second XCLIENT.
    assert not smtp.has_extn("xclient")
    assert smtp.sendmail("sender@example.net", ["rcpt@example.org"],
                         MESSAGE) == {}
    smtp.quit()
    wait_until(lambda: upstream.messages, what="the relayed message")
    message = upstream.messages[0]
    assert message.rcpt_tos == ["rcpt@example.org"]
    received = received_headers(message.content)
    assert received[0].startswith(
        "Received: from client.example.net (unknown [192.0.2.7])"
        " by postfix.test (Postfix) with ESMTP id "), received
    assert server.wait_for_log(": client=unknown[192.0.2.7]")
    assert server.wait_for_log("disconnect from unknown[192.0.2.7]")


def test_postfix_checks_the_xclient_address(upstream, postfix_factory):
    server = postfix_factory(upstream.port)
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    smtp.ehlo("proxy.example")
    # From 127.0.0.1 itself (mynetworks) Postfix relays anywhere...
    assert smtp.docmd("MAIL", "FROM:<sender@example.net>")[0] == 250
    assert smtp.docmd("RCPT", "TO:<rcpt@example.com>")[0] == 250
    smtp.rset()
    assert smtp.docmd("XCLIENT", "ADDR=192.0.2.7 NAME=[UNAVAILABLE]")[0] \
        == 220
    smtp.ehlo("client.example.net")
    # ...but not for 192.0.2.7: only to example.org.
    assert smtp.docmd("MAIL", "FROM:<sender@example.net>")[0] == 250
    code, text = smtp.docmd("RCPT", "TO:<rcpt@example.com>")
    assert code == 554 and b"Relay access denied" in text, text
    assert smtp.docmd("RCPT", "TO:<rcpt@example.org>")[0] == 250
    smtp.quit()
    line, = server.wait_for_log("NOQUEUE: reject: RCPT")
    assert "RCPT from unknown[192.0.2.7]: 554 5.7.1" in line
    assert "helo=<client.example.net>" in line


def test_xforward_is_logged_only(upstream, postfix_factory):
    server = postfix_factory(upstream.port)
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    smtp.ehlo("proxy.example")
    code, text = smtp.docmd("XFORWARD", "ADDR=203.0.113.5 NAME=[UNAVAILABLE]"
                            " HELO=other.example.net PROTO=ESMTP")
    assert (code, text) == (250, b"2.0.0 Ok")
    assert smtp.sendmail("sender@example.net", ["rcpt@example.org"],
                         MESSAGE) == {}
    smtp.quit()
    wait_until(lambda: upstream.messages, what="the relayed message")
    # XFORWARD is for logging: the Received header names the real peer.
    received = received_headers(upstream.messages[0].content)
    assert received[0].startswith(
        "Received: from proxy.example (unknown [127.0.0.1])"), received
    line, = server.wait_for_log("orig_client=")
    assert line.endswith(
        ": client=unknown[127.0.0.1], orig_client=unknown[203.0.113.5]")


def test_without_xclient(upstream, postfix_factory):
    server = postfix_factory(upstream.port, xclient=False)
    smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    smtp.ehlo("proxy.example")
    assert not smtp.has_extn("xclient")
    assert not smtp.has_extn("xforward")
    code, text = smtp.docmd("XCLIENT", "ADDR=192.0.2.7")
    assert code == 550 and b"insufficient authorization" in text, text
    code, text = smtp.docmd("XFORWARD", "ADDR=203.0.113.5")
    assert code == 550 and b"insufficient authorization" in text, text
    assert smtp.sendmail("sender@example.net", ["rcpt@example.org"],
                         MESSAGE) == {}
    smtp.quit()
    wait_until(lambda: upstream.messages, what="the relayed message")
    received = received_headers(upstream.messages[0].content)
    assert received[0].startswith(
        "Received: from proxy.example (unknown [127.0.0.1])"), received


def test_two_instances_and_settings(upstream, postfix_factory):
    first = postfix_factory(upstream.port)
    second = postfix_factory(upstream.port, xclient=False,
                             settings={"smtpd_banner": "$myhostname ESMTP"
                                                       " second"})
    assert first.port != second.port
    assert first.directory != second.directory
    for server, banner in ((first, b"postfix.test ESMTP Postfix"),
                           (second, b"postfix.test ESMTP second")):
        smtp = smtplib.SMTP(timeout=10)
        assert smtp.connect("127.0.0.1", server.port) == (220, banner)
        smtp.ehlo("proxy.example")
        assert smtp.has_extn("xclient") == (server is first)
        smtp.quit()


def test_stop_leaves_nothing_behind(upstream):
    server = postfix.Postfix(upstream.port)
    try:
        with open(os.path.join(server.queue_dir, "pid",
                               "master.pid")) as pid_file:
            master = int(pid_file.read())
        smtp = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        smtp.sendmail("sender@example.net", ["rcpt@example.org"], MESSAGE)
        wait_until(lambda: upstream.messages, what="the relayed message")
        # master, qmgr, postlogd, smtpd, cleanup, smtp, ...
        assert len(session_processes(master)) >= 4
        directory = server.directory
    finally:
        server.stop()
    smtp.close()
    assert session_processes(master) == []
    assert not os.path.exists(directory)
    assert "daemon started -- version %s" % server.version in server.log()
    server.stop()                       # again: nothing happens


def test_missing_postfix_fails_clearly(monkeypatch, upstream):
    monkeypatch.setattr(postfix, "_installation", {})
    monkeypatch.setattr(postfix, "SBIN", [])
    monkeypatch.setenv("PATH", "")
    with pytest.raises(postfix.PostfixError) as error:
        postfix.Postfix(upstream.port)
    assert "Postfix is not installed" in str(error.value)
