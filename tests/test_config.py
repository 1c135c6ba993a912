"""Configuration file (Kamaelia Grey's greylist.conf format), its search
path, and the command line."""

import argparse
import os
import pathlib
import pwd
import smtplib
import subprocess
import sys

import pytest

import smtpproxy
from conftest import HERE, ROOT, free_port

SCRIPT = os.path.join(ROOT, "smtpproxy.py")

# The greylist.conf of the project's reference (Kamaelia Grey), verbatim.
REFERENCE_CONFIG = """\
# Port number that the greylist server listens on
port = 25
servername = mail.example.org
serverid = Kamaelia-SMTP 1.0
smtp_ip = 192.168.0.25
smtp_port = 8025
inactivity_timeout = 60
greylist_log = /var/log/greylist.log
greylist_debuglog = /var/log/greylist-debug.log

allowed_senders:
    127.0.0.1

allowed_sender_nets:
    192.168.2
#    10

allowed_domains:
    localdomain
    example.org

#whitelisted_triples:
#     123.45.67.89 <sender@somedomain> <user@localdomain>
#whitelisted_nonstandard_triples:
#    mx-out.example.net 204.15.20 <user@localdomain>
"""

REFERENCE_VALUES = {
    "port": 25,
    "servername": "mail.example.org",
    "serverid": "Kamaelia-SMTP 1.0",
    "smtp_ip": "192.168.0.25",
    "smtp_port": 8025,
    "inactivity_timeout": 60,
    "greylist_log": "/var/log/greylist.log",
    "greylist_debuglog": "/var/log/greylist-debug.log",
    "allowed_senders": ["127.0.0.1"],
    "allowed_sender_nets": ["192.168.2"],
    "allowed_domains": ["localdomain", "example.org"],
}


def write(tmp_path, text, name="greylist.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def line_of(text, fragment):
    """The 1-based number of the line of ``text`` holding ``fragment``."""
    for number, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError("%r not in the text" % fragment)


def safe_listen():
    """A --listen option for runs that should fail before listening: if they
    do not, they at least do not take port 25."""
    return ["--listen", "127.0.0.1:%d" % free_port()]


def run_cli(args, cwd):
    """Run smtpproxy.py as the command line does; return the result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT])
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), env=env, cwd=str(cwd),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=15)


# ---------------------------------------------------------------------------
# The file format
# ---------------------------------------------------------------------------

def test_reference_file_loads(tmp_path):
    path = write(tmp_path, REFERENCE_CONFIG)
    values, warnings = smtpproxy.read_config_file(path)
    assert values == REFERENCE_VALUES
    assert type(values["port"]) is int
    assert type(values["smtp_port"]) is int
    assert type(values["inactivity_timeout"]) is int
    assert "whitelisted_triples" not in values
    assert "whitelisted_nonstandard_triples" not in values
    assert warnings == []

    loaded, loaded_path, warnings = smtpproxy.load_config(path)
    assert loaded == REFERENCE_VALUES
    assert loaded_path == path
    assert warnings == []


KAMAELIA_TIMINGS = (180, 3600, 25000, 3000000)


def timings(cls):
    return (cls.too_soon, cls.min_defer_time, cls.max_defer_time,
            cls.max_grey)


def test_kamaelia_timings_are_one_line_away_from_the_reference_file(
        tmp_path):
    # The reference file loads unchanged and gets the five-minute wait;
    # one line more gives Kamaelia Grey's hour (README: "How long a new
    # sender waits").
    plain = smtpproxy.handler_class_for(
        smtpproxy.GreyListingPolicy,
        smtpproxy.load_config(write(tmp_path, REFERENCE_CONFIG))[0])
    kamaelia = smtpproxy.handler_class_for(
        smtpproxy.GreyListingPolicy, smtpproxy.load_config(write(
            tmp_path, REFERENCE_CONFIG + "min_defer_time = 3600\n",
            "kamaelia.conf"))[0])
    assert timings(plain) == (180, 300, 25000, 3000000)
    assert timings(kamaelia) == KAMAELIA_TIMINGS
    # A Postfix sender's first retry, 300 to 600 s after its first try
    # (minimal_backoff_time, queue_run_delay), passes by default only.
    key, first = "192.0.2.0/24 a@example.net b@example.org", 1e9
    for cls, verdicts in ((plain, [False, True]),
                          (kamaelia, [False, False])):
        store = smtpproxy.GreylistStore(":memory:", cls)
        assert [store.decide(key, first + wait)
                for wait in (0, 301)] == verdicts
        store.close()


def test_uncommented_triples_are_tuples_of_three_words(tmp_path):
    text = REFERENCE_CONFIG.replace("#whitelisted", "whitelisted").replace(
        "#     123", "     123").replace("#    mx-out", "    mx-out")
    values, warnings = smtpproxy.read_config_file(write(tmp_path, text))
    assert warnings == []
    assert values["whitelisted_triples"] == [
        ("123.45.67.89", "<sender@somedomain>", "<user@localdomain>")]
    assert values["whitelisted_nonstandard_triples"] == [
        ("mx-out.example.net", "204.15.20", "<user@localdomain>")]
    for key, value in REFERENCE_VALUES.items():
        assert values[key] == value


def test_triple_of_two_words_is_an_error_naming_its_line(tmp_path):
    text = ("port = 25\n"
            "whitelisted_triples:\n"
            "    1.2.3.4 <a@example.com> <b@example.org>\n"
            "    5.6.7.8 <c@example.com>\n")
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    message = str(caught.value)
    assert "5.6.7.8 <c@example.com>" in message
    # The offending item is on line 4 (its list starts on line 2).
    assert "%s:%d:" % (path, line_of(text, "5.6.7.8")) in message


def test_list_item_of_several_words_in_a_word_list_is_an_error(tmp_path):
    text = ("allowed_domains:\n"
            "    example.org\n"
            "    example.net example.com\n")
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    assert "%s:3:" % path in str(caught.value)


def test_unknown_key_is_a_warning_naming_file_and_line(tmp_path):
    text = "port = 2525\n\nno_such_key = 1\nservername = mx.example.org\n"
    path = write(tmp_path, text)
    values, warnings = smtpproxy.read_config_file(path)
    assert values == {"port": 2525, "servername": "mx.example.org"}
    assert len(warnings) == 1
    assert "%s:3:" % path in warnings[0]
    assert "no_such_key" in warnings[0]


def test_unknown_list_key_is_a_warning(tmp_path):
    text = "port = 2525\nno_such_list:\n    a\n    b\n"
    path = write(tmp_path, text)
    values, warnings = smtpproxy.read_config_file(path)
    assert values == {"port": 2525}
    assert len(warnings) == 1 and "%s:2:" % path in warnings[0]


@pytest.mark.parametrize("text, fragment", [
    ("servername = a\nport = abc\n", "port = abc"),
    ("smtp_port = 80x\n", "smtp_port"),
    ("inactivity_timeout = -1\n", "inactivity_timeout"),
    ("port =\n", "port ="),
    ("strict = maybe\n", "strict"),
    # A list key written as a scalar, and a scalar key written as a list.
    ("port = 25\nallowed_domains = example.org\n", "allowed_domains"),
    ("servername = a\nport:\n    25\n", "port:"),
    # Garbage lines.
    ("port = 25\nthis is not a setting\n", "this is not"),
    ("port = 25\n\nallowed_domains example.org\n", "allowed_domains"),
    ("    indented = 1\nport = 25\n", "indented"),
])
def test_malformed_line_is_an_error_naming_file_and_line(tmp_path, text,
                                                         fragment):
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    assert "%s:%d:" % (path, line_of(text, fragment)) in str(caught.value)


def test_missing_or_unreadable_file_is_an_error(tmp_path):
    missing = str(tmp_path / "missing.conf")
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.load_config(missing)
    assert missing in str(caught.value)
    # A directory cannot be read as a file, even by root.
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(str(tmp_path))
    assert str(tmp_path) in str(caught.value)
    not_text = tmp_path / "binary.conf"
    not_text.write_bytes(b"port = 25\nservername = \xff\xfe\n")
    with pytest.raises(smtpproxy.ConfigError):
        smtpproxy.read_config_file(str(not_text))


# ---------------------------------------------------------------------------
# The search path
# ---------------------------------------------------------------------------

def test_load_config_uses_first_existing_file_of_search_path(tmp_path,
                                                             monkeypatch):
    first = str(tmp_path / "first.conf")
    second = write(tmp_path, "port = 2002\n", "second.conf")
    third = write(tmp_path, "port = 2003\n", "third.conf")
    monkeypatch.setattr(smtpproxy, "CONFIG_SEARCH_PATH",
                        [first, second, third])
    assert smtpproxy.load_config() == ({"port": 2002}, second, [])
    write(tmp_path, "port = 2001\n", "first.conf")
    assert smtpproxy.load_config() == ({"port": 2001}, first, [])


def test_load_config_without_any_file(tmp_path, monkeypatch):
    monkeypatch.setattr(smtpproxy, "CONFIG_SEARCH_PATH",
                        [str(tmp_path / "a.conf"), str(tmp_path / "b.conf")])
    assert smtpproxy.load_config() == ({}, None, [])


def test_search_path_has_kamaelia_names_then_dist_variants():
    # Kamaelia Grey's own list, in its order: the names, then the .dist
    # variants in the same order.
    kamaelia = ["/usr/local/etc/Kamaelia/greylist.conf",
                "/usr/local/etc/greylist.conf",
                "/etc/Kamaelia/greylist.conf",
                "/etc/greylist.conf",
                "greylist.conf"]
    path = [os.path.normpath(name) for name in smtpproxy.CONFIG_SEARCH_PATH]
    for name in kamaelia + [name + ".dist" for name in kamaelia]:
        assert name in path, name
    positions = [path.index(name) for name in kamaelia]
    assert positions == sorted(positions)
    dist_positions = [path.index(name + ".dist") for name in kamaelia]
    assert dist_positions == sorted(dist_positions)
    # Every name is looked for before any .dist file.
    plain = [i for i, name in enumerate(path) if not name.endswith(".dist")]
    dist = [i for i, name in enumerate(path) if name.endswith(".dist")]
    assert max(plain) < min(dist)
    assert sorted(name + ".dist" for name in path if
                  not name.endswith(".dist")) == sorted(
        name for name in path if name.endswith(".dist"))


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

def test_help(tmp_path):
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--config", "--listen", "--upstream", "--class"):
        assert option in result.stdout
    assert "Usage:" in result.stdout


def test_help_in_process(capsys):
    assert smtpproxy.main(["-h"]) == 0
    out = capsys.readouterr().out
    for option in ("--config", "--listen", "--upstream", "--class"):
        assert option in out


def test_version(tmp_path):
    result = run_cli(["--version"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert smtpproxy.__version__ in result.stdout + result.stderr


def test_malformed_config_exits_2_naming_file_and_line(tmp_path):
    text = "servername = mx.example.org\n\nport = twenty-five\n"
    path = write(tmp_path, text)
    result = run_cli(["--config", path] + safe_listen(), tmp_path)
    assert result.returncode == 2
    assert "%s:3:" % path in result.stderr


def test_missing_config_exits_2(tmp_path):
    path = str(tmp_path / "missing.conf")
    result = run_cli(["--config", path] + safe_listen(), tmp_path)
    assert result.returncode == 2
    assert path in result.stderr


@pytest.mark.parametrize("argv", [
    ["--listen", "127.0.0.1:abc"],
    ["--listen", "127.0.0.1:70000"],
    ["--upstream", "127.0.0.1:0"],
])
def test_bad_address_option_exits_2(tmp_path, argv):
    path = write(tmp_path, "")
    argv = ["--config", path] + safe_listen() + argv
    result = run_cli(argv, tmp_path)
    assert result.returncode == 2
    assert "error" in result.stderr


@pytest.mark.parametrize("name", [
    "nonexistent_module_for_smtpproxy_tests.Handler",
    "smtpproxy.NoSuchHandler",
    "smtpproxy.ConfigError",        # a class, not a handler
    "smtpproxy.log_escape",         # not a class at all
    "plainproxy",                   # a module, not a class
])
def test_bad_class_exits_2(tmp_path, name):
    path = write(tmp_path, "")
    result = run_cli(["--config", path] + safe_listen()
                     + ["--class", name], tmp_path)
    assert result.returncode == 2
    assert "--class" in result.stderr and name in result.stderr


def test_unknown_key_warns_and_proxy_still_starts(proxy_process):
    process = proxy_process(config="no_such_key = 1\nport = 1\n")
    assert process.process.poll() is None
    process.process.terminate()
    process.process.wait(10)
    stderr = process.stderr_text()
    # Line 1 is the greylist_log line the fixture writes.
    assert "%s:2:" % process.config_path in stderr
    assert "no_such_key" in stderr
    assert "WARNING" in stderr


def send_one(port, body=b"Subject: cli\r\n\r\nthrough the command line\r\n"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        refused = smtp.sendmail("sender@example.com", ["rcpt@example.org"],
                                body)
    assert refused == {}
    return body


def test_message_through_command_line_proxy(proxy_process, upstream):
    process = proxy_process()
    body = send_one(process.port)
    assert len(upstream.messages) == 1
    message = upstream.messages[0]
    assert message.mail_from == "sender@example.com"
    assert message.rcpt_tos == ["rcpt@example.org"]
    assert message.content == body


def test_listen_and_upstream_options_override_the_file(proxy_process,
                                                       upstream):
    # The file points elsewhere (an address of TEST-NET-1, RFC 5737); the
    # fixture's --listen and --upstream must win.
    process = proxy_process(config="listen_ip = 192.0.2.1\n"
                                   "port = 1\n"
                                   "smtp_ip = 192.0.2.1\n"
                                   "smtp_port = 1\n"
                                   "upstream_timeout = 3\n")
    body = send_one(process.port)
    assert [m.content for m in upstream.messages] == [body]


def test_upstream_option_without_port_keeps_the_file_port(proxy_process,
                                                          upstream):
    process = proxy_process(
        config="smtp_ip = 192.0.2.1\nsmtp_port = %d\nupstream_timeout = 3\n"
               % upstream.port,
        args=["--upstream", "127.0.0.1"])
    body = send_one(process.port)
    assert [m.content for m in upstream.messages] == [body]


@pytest.mark.parametrize("text, default, expected", [
    ("2525", None, ("", 2525)),
    (":2525", None, ("", 2525)),
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("[::1]:2525", None, ("::1", 2525)),
    ("mail.example.org:2525", 8025, ("mail.example.org", 2525)),
    ("mail.example.org", 8025, ("mail.example.org", 8025)),
    ("127.0.0.1", 8025, ("127.0.0.1", 8025)),
    ("[::1]", 8025, ("::1", 8025)),
])
def test_split_host_port(text, default, expected):
    assert smtpproxy._split_host_port(text, default) == expected


@pytest.mark.parametrize("text, default", [
    ("127.0.0.1:abc", None),
    ("127.0.0.1:0", None),
    ("127.0.0.1:65536", None),
    ("127.0.0.1:", 8025),
    ("[::1]:x", 8025),
    ("[::1]2525", 8025),
    ("mail.example.org", None),
    ("", None),
])
def test_split_host_port_refuses_bad_forms(text, default):
    with pytest.raises(ValueError):
        smtpproxy._split_host_port(text, default)


def test_byte_order_mark_does_not_hide_the_first_key(tmp_path):
    path = tmp_path / "bom.conf"
    path.write_bytes(b"\xef\xbb\xbfport = 2525\n")
    values, warnings = smtpproxy.read_config_file(str(path))
    assert values == {"port": 2525}
    assert warnings == []


def test_file_keys_configure_the_running_handler(proxy_process, upstream):
    from conftest import RawClient
    process = proxy_process(config="servername = mx.example.org\n"
                                   "serverid = TestMTA 9\n"
                                   "max_recipients = 1\n"
                                   "strict = no\n")
    client = RawClient(process.port)
    assert client.greeting[1].startswith("mx.example.org ESMTP TestMTA 9 ")
    client.cmd("EHLO client.example.net")
    client.cmd("MAIL FROM:<a@example.net>")
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<c@example.org>")[0] == 452
    assert client.cmd("BOGUS")[0] == 500
    assert client.cmd("NOOP")[0] == 250          # strict = no: goes on
    client.close()


def test_the_dist_file_documents_every_key_with_its_default():
    path = os.path.join(ROOT, "contrib", "greylist.conf.dist")
    values, warnings = smtpproxy.read_config_file(path)
    assert warnings == []
    assert set(values) == set(smtpproxy.CONFIG_KEYS)
    handler = smtpproxy.GreyListingPolicy
    for key, value in values.items():
        if key in smtpproxy.SERVICE_DEFAULTS:
            assert smtpproxy.SERVICE_DEFAULTS[key] == value, key
        elif key in smtpproxy.SERVER_SETTINGS:
            assert getattr(smtpproxy.SMTPProxyServer, key) == value, key
        elif key in smtpproxy.POLICY_SETTINGS:
            assert getattr(smtpproxy.PolicyServer, key) == value, key
        elif key != "serverid":
            assert getattr(handler, key) == value, key


def test_the_reference_file_drives_a_running_proxy(tmp_path, upstream):
    from conftest import ProxyProcess, RawClient
    # Only the log paths move out of /var/log; the upstream and port come
    # from --upstream and --listen, which override the file.
    text = REFERENCE_CONFIG.replace("/var/log/", str(tmp_path) + "/")
    process = ProxyProcess(tmp_path, upstream.port, config=text,
                           handler=None)
    try:
        client = RawClient(process.port)
        assert client.greeting[1].startswith(
            "mail.example.org ESMTP Kamaelia-SMTP 1.0 ")
        client.cmd("HELO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        # 127.0.0.1 is in allowed_senders: it may relay anywhere.
        assert client.cmd("RCPT TO:<x@elsewhere.example>")[0] == 250
        assert client.cmd("DATA")[0] == 354
        client.send(b"Subject: t\r\n\r\nhi\r\n.\r\n")
        assert client.reply()[0] == 250
        client.cmd("QUIT")
        client.close()
    finally:
        process.stop()
    assert [m.rcpt_tos for m in upstream.messages] == [
        ["x@elsewhere.example"]]
    log_line = (tmp_path / "greylist.log").read_text().splitlines()[-1]
    assert " | client.example.net | 127.0.0.1 | <a@example.net> | " \
        "<x@elsewhere.example> | ACCEPTED | 250 " in log_line


# ---------------------------------------------------------------------------
# Values: what the service would not use is refused at once
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("port = 99999\n", "port from 1 to 65535"),
    ("port = 0\n", "port from 1 to 65535"),
    ("smtp_port = 70000\n", "port from 1 to 65535"),
    ("allowed_senders:\n    not-an-ip\n", "IP address"),
    ("allowed_sender_nets:\n    10.0.0.0/33\n", "192.0.2.0/24"),
    ("allowed_sender_nets:\n    192.168.300\n", "whole octets"),
    ("allowed_domains:\n    @example.org\n", "without '@': example.org"),
    ("allowed_domains:\n    *.example.org\n", "no wildcards"),
    ("allowed_domains:\n    exa mple.org\n", "one word"),
    ("allowed_domains:\n    example..org\n", "domain name"),
    ("proxy_protocol_from:\n    balancer\n", "network"),
    ("whitelisted_triples:\n    host a@b.example <c@d.example>\n",
     "IP address"),
    ("whitelisted_triples:\n    192.0.2.1 a@b.example <c@d.example>\n",
     "angle brackets"),
    ("connection_ipv6_prefix = 129\n", "0 to 128"),
    ("stress_threshold = 101\n", "percentage"),
    ("defer_reply = 550 5.7.1 go away\n", "4xx reply"),
])
def test_malformed_values_are_errors_naming_the_right_form(tmp_path, text,
                                                           expected):
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    line = 2 if ":\n" in text else 1       # a list's item, or the key
    assert "%s:%d:" % (path, line) in str(caught.value)
    assert expected in str(caught.value), str(caught.value)


def test_well_formed_lists_still_load(tmp_path):
    values, _ = smtpproxy.read_config_file(write(tmp_path, (
        "allowed_senders:\n    192.0.2.7\n    2001:db8::7\n"
        "allowed_sender_nets:\n    10\n    192.168.2\n    192.168.2.\n"
        "    10.0.0.0/8\n    192.0.2.7/24\n    2001:db8::/32\n"
        "allowed_domains:\n    example.org\n    mail.example.org.\n"
        "    b\u00fccher.example\n")))
    assert values["allowed_sender_nets"][-2] == "192.0.2.7/24"
    assert values["allowed_domains"][-1] == "b\u00fccher.example"


def test_port_of_the_command_line_is_checked_too(tmp_path):
    result = run_cli(["-o", "port=99999", "--check-config"], tmp_path)
    assert result.returncode == 2
    assert "port from 1 to 65535" in result.stderr


def test_a_bad_dns_list_filter_is_an_error_naming_its_line(tmp_path):
    text = ("dnswl:\n"
            "    list.dnswl.org=127.0.[0..255].[1..3]\n"
            "dnsbl:\n"
            "    zen.spamhaus.org\n"
            "    bl.example.net=127.0.0.[11..2]\n")
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    assert "%s:5: dnsbl:" % path in str(caught.value)
    assert "such as bl.example.net=127.0.0.2" in str(caught.value)
    values, _ = smtpproxy.read_config_file(write(tmp_path, text.replace(
        "[11..2]", "[2;4..11]")))
    assert values["dnswl"] == ["list.dnswl.org=127.0.[0..255].[1..3]"]
    assert values["dnsbl"] == ["zen.spamhaus.org",
                               "bl.example.net=127.0.0.[2;4..11]"]


def test_check_config_refuses_a_bad_dns_list_filter(tmp_path):
    result = run_cli(["-o", "dnswl=list.dnswl.org=127.0.[0..255]",
                      "--check-config"], tmp_path)
    assert result.returncode == 2
    assert "expected four octets" in result.stderr


def test_a_handlers_own_bad_dns_list_filter_stops_the_start():
    handler = type("Lists", (smtpproxy.GreyListingPolicy,),
                   {"dnsbl": ["zen.spamhaus.org", "bl.example=127.0.0"]})
    with pytest.raises(smtpproxy.StartError) as caught:
        smtpproxy.check_dns_lists(handler)
    assert caught.value.status == 2
    assert "dnsbl: 'bl.example=127.0.0': expected four octets" in str(
        caught.value)


def test_check_config_warns_of_a_dnswl_without_its_answers(tmp_path):
    result = run_cli(["-o", "run_as_root=yes", "-o", "allowed_domains="
                      "example.org", "-o", "dnswl=list.dnswl.org,"
                      "wl.example.net,wl.example.com=127.0.0.2",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    [warning] = [line for line in result.stderr.splitlines()
                 if "dnswl" in line]
    assert "dnswl wl.example.net: no answers written" in warning


def test_check_config_warns_that_no_domain_means_every_recipient_refused(
        tmp_path):
    result = run_cli(["-o", "run_as_root=yes", "--check-config", "-q"],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "allowed_domains is empty: every recipient will be refused" in \
        result.stderr


@pytest.fixture
def open_directory():
    """A directory every user may pass through (pytest's are root's)."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="smtpproxy-config-", dir="/tmp")
    os.chmod(base, 0o755)
    yield pathlib.Path(base)
    shutil.rmtree(base, ignore_errors=True)


def test_check_config_refuses_a_store_the_serving_user_cannot_write(
        tmp_path, open_directory):
    assert os.geteuid() == 0, "the tests run as root, as CI does"
    private = open_directory / "private"
    private.mkdir(mode=0o700)
    result = run_cli(["--user", "nobody",
                      "-o", "greylist_db=%s" % (private / "g.db"),
                      "-o", "allowed_domains=example.org",
                      "-o", "greylist_log=", "--check-config"], tmp_path)
    assert result.returncode != 0
    assert "user nobody cannot create it: its directory %s" % private in \
        result.stderr, result.stderr
    assert not (private / "g.db").exists()
    # Once the user may, it passes, and still creates nothing.
    os.chown(str(private), pwd.getpwnam("nobody").pw_uid, -1)
    result = run_cli(["--user", "nobody",
                      "-o", "greylist_db=%s" % (private / "g.db"),
                      "-o", "allowed_domains=example.org",
                      "-o", "greylist_log=", "--check-config", "-q"],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (private / "g.db").exists()


def test_the_dist_file_is_the_sample_the_key_records_make():
    # One record per key (smtpproxy.KEYS) makes --help, the checks and
    # this file: regenerate it with 'smtpproxy.py --sample-config'.
    path = os.path.join(ROOT, "contrib", "greylist.conf.dist")
    with open(path) as dist:
        assert dist.read() == smtpproxy.sample_config()


def test_every_key_has_one_record_whose_default_its_owner_holds():
    names = [key.name for key in smtpproxy.KEYS]
    assert len(names) == len(set(names))
    assert set(names) == set(smtpproxy.CONFIG_KEYS)
    for key in smtpproxy.KEYS:
        owner = {"server": smtpproxy.SMTPProxyServer,
                 "policy": smtpproxy.PolicyServer,
                 "handler": smtpproxy.GreyListingPolicy}.get(key.owner)
        if owner is None:
            assert key.name not in vars(smtpproxy.GreyListingPolicy)
            assert smtpproxy.SERVICE_DEFAULTS[key.name] == key.default
        else:
            assert key.default is None, key.name     # one place only
            assert key.default_value() == getattr(owner, key.name)
    help_text = smtpproxy._usage()
    for key in smtpproxy.KEYS:
        assert "(%s)" % smtpproxy.shown_default(key) in " ".join(
            help_text.split()), key.name


# ---------------------------------------------------------------------------
# List files: several per key, the .local beside each, checked at the start
# ---------------------------------------------------------------------------

LIST_KEYS = ("whitelist_clients", "whitelist_recipients",
             "greytrap_recipients")


def test_a_list_key_takes_one_file_as_before_or_a_list_of_files(tmp_path):
    path = write(tmp_path, "whitelist_clients = /etc/postgrey/whitelist_"
                 "clients\nwhitelist_recipients:\n    /etc/a\n    /etc/b\n"
                 "greytrap_recipients =\n")
    values, warnings = smtpproxy.read_config_file(path)
    assert warnings == []
    assert values["whitelist_clients"] == [
        "/etc/postgrey/whitelist_clients"]
    assert values["whitelist_recipients"] == ["/etc/a", "/etc/b"]
    assert values["greytrap_recipients"] == []
    assert smtpproxy._option_value("whitelist_clients=/a, /b") == (
        "whitelist_clients", ["/a", "/b"])
    # The effective configuration writes one file as it was written.
    shown = smtpproxy.format_config(smtpproxy.GreyListingPolicy,
                                    values).splitlines()
    assert "whitelist_clients = /etc/postgrey/whitelist_clients" in shown
    assert "whitelist_recipients:" in shown and "    /etc/b" in shown
    assert "greytrap_recipients = " in shown
    # A handler's own attribute may still be one name.
    assert smtpproxy.list_paths("/etc/x") == ["/etc/x"]
    assert smtpproxy.list_paths("") == []


def test_relative_list_files_are_read_from_the_directory_of_the_start():
    service = smtpproxy.Service(
        argparse.Namespace(config=None), smtpproxy.GreyListingPolicy,
        {"whitelist_clients": ["clients", "/etc/more"],
         "whitelist_recipients": "recipients"}, None, [], "/srv/mx")
    assert service.values["whitelist_clients"] == [
        "/srv/mx/clients", "/etc/more"]
    assert service.values["whitelist_recipients"] == ["/srv/mx/recipients"]
    assert service.values["greytrap_recipients"] == []
    assert {"whitelist_clients", "whitelist_recipients"} <= set(
        service.relative)
    assert "greytrap_recipients" not in service.relative


def list_config(tmp_path, key, files):
    """A configuration that sets list key ``key`` to ``files``."""
    return write(tmp_path, "allowed_domains:\n    example.org\n%s:\n%s"
                 % (key, "".join("    %s\n" % name for name in files)))


@pytest.mark.parametrize("key", LIST_KEYS)
def test_check_config_refuses_a_missing_list_file_naming_key_and_path(
        tmp_path, key):
    there = tmp_path / "listed"
    there.write_text("other@example.org\n")
    missing = tmp_path / "mistyped"
    config = list_config(tmp_path, key, [there, missing])
    result = run_cli(["--config", config, "-o", "run_as_root=yes",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 2
    assert ("%s %s: cannot read it: No such file or directory; correct the "
            "name, make the file (it may be empty) readable, or remove it "
            "from %s" % (key, missing, key)) in result.stderr


def test_a_missing_whitelist_file_stops_the_start_not_the_first_rcpt(
        tmp_path):
    config = list_config(tmp_path, "whitelist_clients",
                         [tmp_path / "mistyped"])
    result = run_cli(["--config", config, "-o", "run_as_root=yes",
                      "-o", "greylist_log=", "-o", "pidfile="]
                     + safe_listen(), tmp_path)
    assert result.returncode == 2
    assert "whitelist_clients %s: cannot read it" % (
        tmp_path / "mistyped") in result.stderr


def test_a_missing_local_file_is_fine_one_that_cannot_be_read_is_not(
        tmp_path):
    listed = tmp_path / "whitelist_recipients"
    listed.write_text("abuse@example.org\n")
    config = list_config(tmp_path, "whitelist_recipients", [listed])
    result = run_cli(["--config", config, "-o", "run_as_root=yes",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    (tmp_path / "whitelist_recipients.local").mkdir()
    result = run_cli(["--config", config, "-o", "run_as_root=yes",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 2
    assert "whitelist_recipients %s.local: cannot read it: Is a directory" \
        % listed in result.stderr


def test_a_bad_regular_expression_of_a_local_file_stops_the_check(
        tmp_path):
    listed = tmp_path / "whitelist_clients"
    listed.write_text("192.0.2.7\n")
    (tmp_path / "whitelist_clients.local").write_text("/mx[0-9/\n")
    handler = type("Lists", (smtpproxy.GreyListingPolicy,),
                   {"whitelist_clients": str(listed)})
    with pytest.raises(smtpproxy.StartError) as caught:
        smtpproxy.check_list_files(handler)
    assert "whitelist_clients %s.local:1: bad regular expression" % listed \
        in str(caught.value)
