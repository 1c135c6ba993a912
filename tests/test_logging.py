"""The transaction log (Kamaelia Grey's greylist.log format, plus the final
reply), the dialogue log, and the escaping of what clients and upstreams
send."""

import calendar
import logging
import re
import smtplib
import time

import pytest

import smtpproxy
from conftest import RawClient, free_port, wait_until

STAMP_RE = re.compile(r"\A([0-9]{14})\.([0-9]{3})\Z")


class Capture(logging.Handler):
    """Keeps every record it gets (from any thread)."""

    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self):
        return [record.getMessage() for record in self.records]


def attach(logger_name, level):
    logger = logging.getLogger(logger_name)
    handler = Capture()
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore():
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return handler, restore


@pytest.fixture
def transactions(monkeypatch):
    """The transaction log records, with the local time zone far from UTC
    so that a local time stamp cannot pass for UTC."""
    monkeypatch.setenv("TZ", "NPT-5:45")
    time.tzset()
    handler, restore = attach("smtpproxy.transactions", logging.INFO)
    yield handler
    restore()
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def all_logs():
    """Every record of the smtpproxy loggers, the dialogue at DEBUG."""
    captured = []
    restores = []
    for name, level in (("smtpproxy", logging.DEBUG),
                        ("smtpproxy.transactions", logging.INFO),
                        ("smtpproxy.dialogue", logging.DEBUG)):
        handler, restore = attach(name, level)
        # Each logger's own handler only: no record is seen twice.
        logging.getLogger(name).propagate = False
        captured.append(handler)
        restores.append(restore)
    yield captured
    for restore in restores:
        restore()


def fields_of(line):
    """Split a transaction line: the seven fields, checking the final
    separator."""
    assert line.endswith(" | "), line
    fields = line[:-3].split(" | ")
    assert len(fields) == 7, fields
    return fields


def check_stamp(stamp, before, after):
    """``YYYYMMDDHHMMSS.mmm`` in UTC, taken between ``before`` and
    ``after`` (time.time() values)."""
    match = STAMP_RE.match(stamp)
    assert match, stamp
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y%m%d%H%M%S"))
    when = seconds + int(match.group(2)) / 1000.0
    assert before - 0.002 <= when <= after + 0.002, (stamp, before, after)
    assert (time.strftime("%Y%m%d%H%M%S", time.gmtime(before))
            <= match.group(1)
            <= time.strftime("%Y%m%d%H%M%S", time.gmtime(after)))


def raw_transaction(client, sender, recipients, helo="client.example"):
    assert client.cmd("EHLO " + helo)[0] == 250
    assert client.cmd("MAIL FROM:<%s>" % sender)[0] == 250
    for recipient in recipients:
        assert client.cmd("RCPT TO:<%s>" % recipient)[0] == 250


# ---------------------------------------------------------------------------
# The transaction log
# ---------------------------------------------------------------------------

def test_accepted_transaction_line(proxy, upstream, transactions):
    port = proxy()
    before = time.time()
    with smtplib.SMTP("127.0.0.1", port, timeout=10,
                      local_hostname="client.example") as smtp:
        smtp.sendmail("sender@example.com",
                      ["r1@example.org", "r2@example.org"],
                      b"Subject: log\r\n\r\nbody\r\n")
    wait_until(lambda: transactions.records, what="the transaction line")
    after = time.time()
    assert len(upstream.messages) == 1
    # After QUIT and disconnect no second line is written.
    proxy.wait_idle()
    lines = transactions.messages()
    assert len(lines) == 1, lines
    stamp, helo, ip, sender, recipients, status, reply = fields_of(lines[0])
    check_stamp(stamp, before, after)
    assert helo == "client.example"
    assert ip == "127.0.0.1"
    assert sender == "<sender@example.com>"
    assert recipients == "<r1@example.org>, <r2@example.org>"
    assert status == "ACCEPTED"
    assert reply == "250 2.0.0 Ok: queued as TEST1"
    assert transactions.records[0].levelno == logging.INFO


def test_deferred_transaction_line(proxy, upstream, client_factory,
                                   transactions):
    port = proxy(handler=smtpproxy.ConcreteMailHandler)
    before = time.time()
    client = client_factory(port)
    raw_transaction(client, "sender@example.com", ["rcpt@example.org"],
                    helo="deferred.example")
    code, text = client.cmd("DATA")
    assert code == 451 and text.startswith("4.7.1"), (code, text)
    assert client.is_closed()
    wait_until(lambda: transactions.records, what="the transaction line")
    after = time.time()
    proxy.wait_idle()
    lines = transactions.messages()
    assert len(lines) == 1, lines
    stamp, helo, ip, sender, recipients, status, reply = fields_of(lines[0])
    check_stamp(stamp, before, after)
    assert (helo, ip, sender, recipients) == (
        "deferred.example", "127.0.0.1", "<sender@example.com>",
        "<rcpt@example.org>")
    assert status == "DEFERRED"
    assert reply == "451 4.7.1 Please try again later"
    assert upstream.messages == []


def test_transactions_ended_before_data_have_empty_status(
        proxy, upstream, client_factory, transactions):
    client = client_factory(proxy())
    before = time.time()
    raw_transaction(client, "first@example.com", ["a@example.org"])
    assert client.cmd("RSET")[0] == 250
    assert client.cmd("MAIL FROM:<second@example.com>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<c@example.org>")[0] == 250
    assert client.cmd("QUIT")[0] == 221
    assert client.is_closed()
    wait_until(lambda: len(transactions.records) >= 2,
               what="two transaction lines")
    after = time.time()
    proxy.wait_idle()
    lines = transactions.messages()
    assert len(lines) == 2, lines
    first, second = [fields_of(line) for line in lines]
    for fields in (first, second):
        check_stamp(fields[0], before, after)
        assert fields[1:3] == ["client.example", "127.0.0.1"]
        assert fields[5:] == ["", ""]
    assert first[3:5] == ["<first@example.com>", "<a@example.org>"]
    assert second[3:5] == ["<second@example.com>",
                           "<b@example.org>, <c@example.org>"]
    assert upstream.messages == []


class RefuseSome(smtpproxy.ConcreteMailHandler):
    """Relays example.org's recipients; defers later.example's, refuses
    the others."""

    def shouldWeAcceptRecipient(self, recipient):
        if recipient.endswith("@example.org"):
            return True
        if recipient.endswith("@later.example"):
            return "450 4.2.0 Not now"
        return "550 5.7.1 Relaying denied"

    def shouldWeAcceptMail(self):
        return True


def last_status(transactions):
    """The status and reply fields of the last transaction line."""
    wait_until(lambda: transactions.records, what="the transaction line")
    return fields_of(transactions.messages()[-1])[5:]


@pytest.mark.parametrize("recipients, expected", [
    (["x@elsewhere.example"], ["REFUSED", "550 5.7.1 Relaying denied"]),
    (["x@later.example", "y@elsewhere.example"],
     ["DEFERRED", "450 4.2.0 Not now"]),
    (["unknown@example.org"], ["REFUSED", "550 5.1.1 no such user"]),
])
def test_transactions_refused_before_data_say_so(
        proxy, upstream, client_factory, transactions, recipients, expected):
    upstream.handler.reject["unknown@example.org"] = \
        "550 5.1.1 no such user"
    client = client_factory(proxy(handler=RefuseSome))
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    for recipient in recipients:
        assert client.cmd("RCPT TO:<%s>" % recipient)[0] in (450, 550)
    assert client.cmd("QUIT")[0] == 221
    assert last_status(transactions) == expected


def test_an_upstream_down_is_logged_as_failed(proxy, client_factory,
                                              transactions):
    client = client_factory(proxy(smtp_port=free_port()))
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 451
    assert client.cmd("QUIT")[0] == 221
    status, reply = last_status(transactions)
    assert status == "FAILED"
    assert reply.startswith("451 4.4.1 ")


def test_a_message_the_upstream_refuses_is_logged_as_refused(
        proxy, upstream, transactions):
    upstream.handler.data_reply = "554 5.6.0 no thanks"
    port = proxy()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPDataError):
            smtp.sendmail("a@example.net", ["b@example.org"],
                          b"Subject: no\r\n\r\nbody\r\n")
    assert last_status(transactions) == ["REFUSED", "554 5.6.0 no thanks"]


def test_timeout_in_data_logs_the_421_the_client_got(proxy, upstream,
                                                      client_factory,
                                                      transactions):
    client = client_factory(proxy(inactivity_timeout=1))
    raw_transaction(client, "sender@example.com", ["rcpt@example.org"])
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: half\r\n\r\nhalf a message\r\n")
    code, text = client.reply()
    assert code == 421, (code, text)
    assert client.is_closed()
    wait_until(lambda: transactions.records, what="the transaction line")
    lines = transactions.messages()
    assert len(lines) == 1, lines
    fields = fields_of(lines[0])
    assert fields[3:5] == ["<sender@example.com>", "<rcpt@example.org>"]
    # The extra field is the final reply to the client: the 421.
    assert fields[6] == "421 " + text, fields
    assert upstream.messages == []


def test_transaction_log_file_of_command_line_proxy(proxy_process, upstream,
                                                    tmp_path, monkeypatch):
    # The subprocess inherits a local time zone far from UTC.
    monkeypatch.setenv("TZ", "NPT-5:45")
    # The upstream session's end tells that the session is over: none
    # kept for the next client.
    process = proxy_process(config="upstream_pool_size = 0\n")
    log_path = tmp_path / "greylist.log"
    before = time.time()
    with smtplib.SMTP("127.0.0.1", process.port, timeout=10,
                      local_hostname="file.example") as smtp:
        smtp.sendmail("sender@example.com", ["rcpt@example.org"],
                      b"Subject: file\r\n\r\nbody\r\n")
    wait_until(lambda: log_path.exists() and log_path.read_text(),
               what="the greylist_log file")
    after = time.time()
    wait_until(lambda: upstream.open_connections == 0,
               what="the upstream session to end")
    text = log_path.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == 1, lines
    stamp, helo, ip, sender, recipients, status, reply = fields_of(lines[0])
    check_stamp(stamp, before, after)
    assert (helo, ip, sender, recipients, status) == (
        "file.example", "127.0.0.1", "<sender@example.com>",
        "<rcpt@example.org>", "ACCEPTED")
    assert reply.startswith("250 ")


# ---------------------------------------------------------------------------
# No raw client byte in a log line
# ---------------------------------------------------------------------------

def printable(text):
    return all(0x20 <= ord(char) <= 0x7e for char in text)


HOSTILE_COMMANDS = [
    b"NOOP\rINJECTED 250 fake\r\n",                     # bare CR
    b"NOOP \x1b[2J\x1b]0;owned\x07\r\n",               # ESC, BEL
    b"NOOP \x7f\x7f\r\n",                               # DEL
    b"NOOP \x00 nul\r\n",                               # NUL
    b"NOOP \xe9\xff\xc3\xa9 8bit\r\n",                  # 8-bit bytes
    b"NOOP bare lf\n",                                  # bare LF
    b"EHLO \x1bevil\r\n",
    b"\x1b\r" * 300 + b"\r\n",                          # overlong line
]


def test_no_raw_client_byte_reaches_a_log_line(proxy, upstream,
                                               client_factory, all_logs):
    client = client_factory(proxy(strict=False))
    assert client.cmd("EHLO client.example")[0] == 250
    for command in HOSTILE_COMMANDS:
        client.send(command)
        code, text = client.reply()
        assert code // 100 == 5, (command, code, text)
    # A '|' and even ' | ' in addresses: legal in a local-part.
    assert client.cmd('MAIL FROM:<"x | y"@example.com>')[0] == 250
    assert client.cmd("RCPT TO:<a|b@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<c@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: \x1b[31m\r\n\r\n\x7f\xff\r\n.\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert client.cmd("QUIT")[0] == 221
    assert client.is_closed()
    proxy.wait_idle()

    root, transactions, dialogue = all_logs
    messages = [m for handler in all_logs for m in handler.messages()]
    for message in messages:
        assert printable(message), repr(message)
    assert not [r for h in all_logs for r in h.records
                if r.levelno >= logging.ERROR]

    # The dialogue was logged, with the hostile bytes escaped.
    dialogue_text = "\n".join(dialogue.messages())
    for escaped in ("\\x0d", "\\x1b", "\\x07", "\\x7f", "\\x00", "\\xe9",
                    "\\xff", "\\x0a"):
        assert escaped in dialogue_text, escaped
    assert "INJECTED" in dialogue_text

    # The transaction line: seven fields whatever the addresses hold.
    lines = transactions.messages()
    assert len(lines) == 1, lines
    fields = fields_of(lines[0])
    assert fields[3] == '<"x \\x7c y"@example.com>'
    assert fields[4] == "<a\\x7cb@example.org>, <c@example.org>"
    assert fields[5] == "ACCEPTED"


def test_log_every_logs_a_condition_once_per_interval_each_time_it_comes(
        caplog):
    caplog.set_level("DEBUG", logger="smtpproxy")

    def down(key, now):
        return smtpproxy.log_every(("down", key), 60, logging.WARNING,
                                   "%s is down", key, now=now)
    assert down("a", 1000)
    assert not down("a", 1001)
    assert not down("a", 1059.9)
    assert down("b", 1030)              # another key, its own interval
    assert down("a", 1060)              # an interval on: again
    assert not down("a", 1119)
    assert down("a", 1000000)           # days later: again, not silent
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "a is down"), (logging.WARNING, "b is down"),
        (logging.WARNING, "a is down"), (logging.WARNING, "a is down")]


def test_log_every_remembers_a_bounded_number_of_keys():
    remembered = smtpproxy._log_times
    for number in range(3 * remembered.size):
        smtpproxy.log_every(("key", number), 60, logging.DEBUG, "x", now=0)
    assert len(remembered) == remembered.size
    # The most recent are the ones kept: still within their interval.
    assert not smtpproxy.log_every(("key", 3 * remembered.size - 1), 60,
                                   logging.DEBUG, "x", now=1)


def test_log_escape_bytes():
    escaped = smtpproxy.log_escape(b"a\r\n\x1b[0m\\|\x7f\xff\x00 ~")
    assert escaped == "a\\x0d\\x0a\\x1b[0m\\\\|\\x7f\\xff\\x00 ~"


def test_log_escape_str():
    assert smtpproxy.log_escape("plain text ~!") == "plain text ~!"
    assert smtpproxy.log_escape("back\\slash") == "back\\\\slash"
    assert (smtpproxy.log_escape("\t\x85\xe9\u20ac\U0001f600")
            == "\\x09\\x85\\xe9\\u20ac\\U0001f600")
    assert smtpproxy.log_escape(42) == "42"


SAMPLES = ["", "\\", "\\\\", "\\x1b", "\x1b", "\\x5c", "\\\x1b", "|",
           "a\r\nb", "\x00\x7f\x80\xff", "\u20ac\\u20ac", "\U0001f600",
           "\\U0001f600", "plain"]


def test_log_escape_round_trip_is_unambiguous():
    outputs = {}
    for sample in SAMPLES:
        escaped = smtpproxy.log_escape(sample)
        assert printable(escaped), repr(escaped)
        assert escaped.encode("ascii").decode("unicode_escape") == sample
        outputs.setdefault(escaped, sample)
        assert outputs[escaped] == sample, (escaped, sample)
    for sample in SAMPLES:
        data = sample.encode("utf-8")
        escaped = smtpproxy.log_escape(data)
        assert printable(escaped)
        assert (escaped.encode("ascii").decode("unicode_escape")
                .encode("latin-1") == data)


# ---------------------------------------------------------------------------
# Upstream replies are cleaned before they reach the client
# ---------------------------------------------------------------------------

def test_upstream_reply_control_characters_cleaned(proxy, upstream,
                                                   client_factory,
                                                   transactions):
    upstream.handler.reject["bad@example.org"] = (
        "550 5.1.1 <bad@example.org>\x1b[31m unknown\x7f user\x07\x01")
    upstream.handler.data_reply = "250 2.0.0 Ok\x1b]0;pwned\x07 queued\x00"
    client = client_factory(proxy())
    raw_transaction(client, "sender@example.com", [])
    code, text = client.cmd("RCPT TO:<bad@example.org>")
    assert code == 550, (code, text)
    assert "unknown" in text and "user" in text
    assert printable(text), repr(text)
    assert client.cmd("RCPT TO:<good@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    code, text = client.reply()
    assert code == 250, (code, text)
    assert "queued" in text
    assert printable(text), repr(text)
    assert client.cmd("QUIT")[0] == 221
    assert len(upstream.messages) == 1
    wait_until(lambda: transactions.records, what="the transaction line")
    line = transactions.messages()[0]
    assert printable(line)
    assert fields_of(line)[6].startswith("250 2.0.0 Ok")


@pytest.mark.parametrize("debug", [True, False])
def test_debug_writes_the_dialogue_to_greylist_debuglog(proxy_process,
                                                        upstream, tmp_path,
                                                        debug):
    debuglog = tmp_path / "greylist-debug.log"
    process = proxy_process(
        config="greylist_debuglog = %s\n" % debuglog,
        args=["--debug"] if debug else [])
    client = RawClient(process.port)
    client.cmd("EHLO dialogue.example.net")
    client.cmd("MAIL FROM:<a\x1b@example.net>")
    client.cmd("QUIT")
    client.close()
    process.stop()
    if not debug:
        assert not debuglog.exists() or "dialogue.example.net" not in \
            debuglog.read_text()
        return
    text = debuglog.read_bytes().decode("ascii")
    assert "< EHLO dialogue.example.net" in text
    assert "> 221 2.0.0" in text
    assert "a\\x1b@example.net" in text
    assert all(" " <= char <= "~" for line in text.splitlines()
               for char in line)
