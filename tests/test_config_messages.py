"""Configuration a postgrey user writes without surprises (inline
comments, times with units), and messages that point at the right fix
(unknown keys, IPv6 addresses with a port, privileged ports, the listen
address and the real server checked by --check-config)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

import smtpproxy
from conftest import HERE, ROOT, free_port, wait_until

README = os.path.join(ROOT, "README.md")
SCRIPT = os.path.join(ROOT, "smtpproxy.py")


def write(tmp_path, text, name="greylist.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_cli(args, cwd):
    """Run smtpproxy.py as the command line does (in ``cwd``, where its
    relative files go; as root, serving as root: the tests run as root)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT])
    if os.geteuid() == 0:
        args = ["-o", "run_as_root=yes"] + list(args)
    return subprocess.run(
        [sys.executable, SCRIPT] + list(args), env=env, cwd=str(cwd),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=30)


def readme_block(fragment):
    """The README's indented block (a configuration or shell block) that
    holds ``fragment``, unindented."""
    with open(README) as readme:
        text = readme.read()
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if (fragment in block
                and all(line.startswith("    ") for line in lines if line)):
            return "\n".join(line[4:] for line in lines) + "\n"
    raise AssertionError("no block of the README holds %r" % fragment)


# ---------------------------------------------------------------------------
# Inline comments
# ---------------------------------------------------------------------------

def test_an_inline_comment_is_not_part_of_a_text_value(tmp_path):
    path = write(tmp_path, "servername = mx.example.org   # our MX\n")
    values, warnings = smtpproxy.read_config_file(path)
    assert values == {"servername": "mx.example.org"}
    assert warnings == []


def test_an_inline_comment_after_a_number_parses(tmp_path):
    path = write(tmp_path, "workers = 3\t# processes\nport = 2525 #\n")
    values, _ = smtpproxy.read_config_file(path)
    assert values == {"workers": 3, "port": 2525}


def test_inline_comments_on_a_list_and_its_items(tmp_path):
    path = write(tmp_path, "allowed_domains:   # ours\n"
                           "    example.org    # the main one\n"
                           "    # example.com  (gone)\n"
                           "    example.net\n"
                           "whitelisted_triples:\n"
                           "    192.0.2.7 <a@example.net> <b@example.org>"
                           "  # a partner\n")
    values, _ = smtpproxy.read_config_file(path)
    assert values == {
        "allowed_domains": ["example.org", "example.net"],
        "whitelisted_triples": [
            ("192.0.2.7", "<a@example.net>", "<b@example.org>")]}


def test_a_hash_without_a_blank_before_it_stays_in_the_value(tmp_path):
    path = write(tmp_path, "servername = mx#1.example.org\n"
                           "defer_reply = 451 4.7.1 Greylisted,#try later\n")
    values, _ = smtpproxy.read_config_file(path)
    assert values["servername"] == "mx#1.example.org"
    assert values["defer_reply"] == "451 4.7.1 Greylisted,#try later"


@pytest.mark.parametrize("fragment, expected", [
    ("spare_threads = 20", {"workers": "auto", "spare_threads": 20,
                            "upstream_pool_size": 10}),
    ("# our MX, in the greeting", {
        "servername": "mx.example.org", "smtp_port": 8025, "strict": True,
        "allowed_domains": ["example.org"]}),
])
def test_the_readmes_blocks_with_inline_comments_parse(tmp_path, fragment,
                                                       expected):
    block = readme_block(fragment)
    assert " # " in block.replace("\t", " ")        # it has some
    values, warnings = smtpproxy.read_config_file(write(tmp_path, block))
    assert values == expected
    assert warnings == []


# ---------------------------------------------------------------------------
# Unknown keys: "did you mean"
# ---------------------------------------------------------------------------

def cli_error(capsys, *argv):
    """main()'s status and standard error for a command line that stops
    at reading the settings."""
    status = smtpproxy.main(list(argv) + ["--check-config"])
    return status, capsys.readouterr().err


def test_an_unknown_option_key_is_named_with_the_nearest_keys(capsys):
    status, error = cli_error(capsys, "-o", "greylist_delay=60")
    assert status == 2
    assert "unknown key greylist_delay" in error
    assert "expected KEY=VALUE" not in error
    assert "did you mean min_defer_time (postgrey's --delay)" in error
    assert "greylist_db?" in error


def test_a_mistyped_option_key_gets_the_key_meant(capsys):
    status, error = cli_error(capsys, "-o", "servrname=mx.example.org")
    assert status == 2
    assert error.strip().endswith(
        "unknown key servrname; did you mean servername?")


@pytest.mark.parametrize("postgrey, key", [
    ("delay", "min_defer_time"),
    ("max-age", "max_grey"),
    ("retry-window", "max_defer_time"),
    ("greylist-text", "defer_reply"),
    ("auto-whitelist-clients", "auto_whitelist_clients"),
    ("whitelist-clients", "whitelist_clients"),
    ("whitelist-recipients", "whitelist_recipients"),
    ("dbdir", "greylist_db"),
    ("privacy", "hash_keys"),
])
def test_a_postgrey_option_name_gets_the_key_that_does_its_work(
        capsys, postgrey, key):
    status, error = cli_error(capsys, "-o", "%s=1" % postgrey)
    assert status == 2
    assert ("unknown key %s; did you mean %s (postgrey's --%s)"
            % (postgrey, key, postgrey)) in error


def test_an_option_without_equals_still_asks_for_key_equals_value(capsys):
    status, error = cli_error(capsys, "-o", "servername")
    assert status == 2
    assert "expected KEY=VALUE" in error


def test_an_unknown_key_in_the_file_warns_with_the_key_meant(tmp_path):
    path = write(tmp_path, "servername = mx.example.org\n"
                           "max-age = 35d\nmin_defer_tme = 300\n")
    values, warnings = smtpproxy.read_config_file(path)
    assert values == {"servername": "mx.example.org"}
    assert warnings == [
        "%s:2: unknown key 'max-age' ignored; did you mean max_grey "
        "(postgrey's --max-age) or max_message_size?" % path,
        "%s:3: unknown key 'min_defer_tme' ignored; did you mean "
        "min_defer_time or max_defer_time?" % path]


# ---------------------------------------------------------------------------
# IPv6 addresses with a port
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, said", [
    (["--listen", "::1:12901"], "--listen ::1:12901: an IPv6 address with "
                                "a port is written in brackets: [::1]:12901"),
    (["--upstream", "2001:db8::7:12901"],
     "--upstream 2001:db8::7:12901: an IPv6 address with a port is written "
     "in brackets: [2001:db8::7]:12901"),
    (["--policy-listen", "::1:10023"], "[::1]:10023"),
    (["-o", "metrics_listen=::1:9025"], "[::1]:9025"),
    (["--listen", "::1"], "no port in '::1': an IPv6 address with its port "
                          "is written in brackets, [::1]:PORT"),
])
def test_an_ipv6_address_with_a_port_is_told_to_take_brackets(
        capsys, argv, said):
    status, error = cli_error(capsys, *argv)
    assert status == 2
    assert said in error


def test_an_upstream_that_reads_both_ways_is_refused_with_both_forms(capsys):
    # ::1:8025 is an address too (its last group is hex): which is meant?
    status, error = cli_error(capsys, "--upstream", "::1:8025")
    assert status == 2
    assert ("::1:8025 is ambiguous: write [::1]:8025 for port 8025 of ::1, "
            "or [::1:8025] for the address ::1:8025") in error


def test_a_policy_listen_in_the_file_is_told_to_take_brackets(tmp_path):
    path = write(tmp_path, "policy_listen = ::1:10023   # for Postfix\n")
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    assert str(caught.value) == (
        "%s:1: policy_listen: an IPv6 address with a port is written in "
        "brackets: [::1]:10023, not ::1:10023" % path)


@pytest.mark.parametrize("text, default, expected", [
    ("[::1]:12901", None, ("::1", 12901)),
    ("::1", 8025, ("::1", 8025)),
    ("2001:db8::7", 25, ("2001:db8::7", 25)),
    ("[::1:8025]", 25, ("::1:8025", 25)),
])
def test_ipv6_addresses_written_as_they_should_still_read(text, default,
                                                          expected):
    assert smtpproxy._split_host_port(text, default) == expected


# ---------------------------------------------------------------------------
# Times with units
# ---------------------------------------------------------------------------

# Every key that is a time; those in whole seconds are ints for the code.
WHOLE_SECOND_KEYS = (
    "upstream_timeout", "upstream_pool_idle", "upstream_capabilities_ttl",
    "inactivity_timeout", "max_session_time", "greet_pause",
    "greylist_cache_time", "too_soon", "min_defer_time", "max_defer_time",
    "max_grey", "dns_cache_time", "client_name_cache_time", "greytrap_time",
    "policy_first_idle", "policy_max_idle", "thread_idle_time",
    "stress_timeout", "grace_period")
DECIMAL_SECOND_KEYS = ("greylist_db_timeout", "dns_timeout")


def test_every_key_in_seconds_is_a_time_key():
    # Their help names seconds, and they are no time.
    not_times = ("x_greylist_header", "stress_threshold", "defer_reply")
    in_seconds = set(key.name for key in smtpproxy.KEYS
                     if "second" in key.help and key.name not in not_times)
    assert in_seconds <= set(WHOLE_SECOND_KEYS + DECIMAL_SECOND_KEYS)


@pytest.mark.parametrize("key", WHOLE_SECOND_KEYS + DECIMAL_SECOND_KEYS)
def test_every_time_key_takes_units_in_the_file(tmp_path, key):
    path = write(tmp_path, "%s = 1h30m\n" % key)
    values, _ = smtpproxy.read_config_file(path)
    assert values == {key: 5400}
    assert type(values[key]) is int


@pytest.mark.parametrize("key", WHOLE_SECOND_KEYS + DECIMAL_SECOND_KEYS)
def test_every_time_key_takes_units_with_o(key):
    assert smtpproxy._option_value("%s=2d" % key) == (key, 172800)


def test_a_postgrey_users_times_read_as_seconds(tmp_path):
    path = write(tmp_path, "too_soon = 0\n"
                           "min_defer_time = 5m     # postgrey's --delay\n"
                           "max_defer_time = 2d\n"
                           "max_grey = 35d\n"
                           "greytrap_time = 1w\n"
                           "inactivity_timeout = 1m30s\n"
                           "dns_timeout = 1.5s\n"
                           "greylist_db_timeout = 0.5\n")
    values, warnings = smtpproxy.read_config_file(path)
    assert values == {"too_soon": 0, "min_defer_time": 300,
                      "max_defer_time": 172800, "max_grey": 3024000,
                      "greytrap_time": 604800, "inactivity_timeout": 90,
                      "dns_timeout": 1.5, "greylist_db_timeout": 0.5}
    assert warnings == []


def test_check_config_shows_times_set_with_units_in_seconds(tmp_path):
    path = write(tmp_path, "max_defer_time = 2d\nmax_grey = 35d\n")
    result = run_cli(["--config", path, "-o", "min_defer_time=5m",
                      "--grace-period", "1m", "--check-config"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    for line in ("min_defer_time = 300", "max_defer_time = 172800",
                 "max_grey = 3024000", "grace_period = 60"):
        assert line in out


@pytest.mark.parametrize("text, expected", [
    ("too_soon = 0.5\n", "expected whole seconds"),
    ("max_grey = 1.5s\n", "expected whole seconds"),
    ("greytrap_time = 0\n", "1 second or more"),
    ("dns_timeout = 0s\n", "a time above 0"),
    ("min_defer_time = 5 minutes\n", "the units s, m, h, d, w"),
    ("min_defer_time = 30m1h\n", "largest first"),
    ("max_defer_time = -2d\n", "no sign"),
])
def test_a_time_that_cannot_be_is_an_error_naming_the_form(tmp_path, text,
                                                           expected):
    path = write(tmp_path, text)
    with pytest.raises(smtpproxy.ConfigError) as caught:
        smtpproxy.read_config_file(path)
    assert str(caught.value).startswith("%s:1: " % path)
    assert expected in str(caught.value)


# ---------------------------------------------------------------------------
# A port below 1024 as a normal user
# ---------------------------------------------------------------------------

# The command line as an ordinary user (nobody): a test run as root
# imports the module (and what it imports, and the codec socket imports
# when first asked: the interpreter may be under root's home) before it
# gives root up for good.
AS_NOBODY = """\
import encodings.idna, gettext, locale, os, sys
sys.path.insert(0, %r)
import smtpproxy
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
sys.exit(smtpproxy.main(sys.argv[1:]))
""" % ROOT


@pytest.fixture
def nobodys_directory():
    """A directory of nobody's, for the logs and store of a start as
    nobody (pytest's are root's, closed to others)."""
    base = tempfile.mkdtemp(prefix="smtpproxy-messages-", dir="/tmp")
    os.chmod(base, 0o755)
    if os.geteuid() == 0:
        os.chown(base, 65534, 65534)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run_as_nobody(args, cwd):
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY] + list(args), cwd=cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=30)


needs_a_privileged_port = pytest.mark.skipif(
    smtpproxy.unprivileged_port_start() <= 25,
    reason="any user may bind port 25 here")

PRIVILEGED_ADVICE = (
    "port 25 is below 1024: only root, or a process with "
    "CAP_NET_BIND_SERVICE, may listen on it.  Start smtpproxy as root (it "
    "binds the port, then serves as 'user'), or give the interpreter the "
    "capability (setcap cap_net_bind_service=+ep ")


@needs_a_privileged_port
def test_port_25_as_a_normal_user_says_what_to_do(nobodys_directory):
    result = run_as_nobody(["--listen", "127.0.0.1:25", "-o", "workers=1",
                            "-o", "allowed_domains=example.org"],
                           nobodys_directory)
    assert result.returncode == 1
    assert ("smtpproxy: error: cannot listen on [127.0.0.1]:25: [Errno 13] "
            "Permission denied; " + PRIVILEGED_ADVICE) in result.stderr
    assert "or listen on a port above 1023 and redirect port 25 to it" in \
        result.stderr


@needs_a_privileged_port
def test_a_policy_port_below_1024_as_a_normal_user_says_what_to_do(
        nobodys_directory):
    result = run_as_nobody(["-o", "smtp_proxy=no", "--policy-listen",
                            "127.0.0.1:25", "-o", "workers=1"],
                           nobodys_directory)
    assert result.returncode == 1
    assert ("cannot listen for policy requests on 127.0.0.1:25: [Errno 13] "
            "Permission denied; " + PRIVILEGED_ADVICE) in result.stderr


@needs_a_privileged_port
def test_check_config_as_a_normal_user_refuses_port_25_as_the_start_would(
        nobodys_directory):
    result = run_as_nobody(["--listen", "127.0.0.1:25", "--check-config",
                            "-q", "-o", "allowed_domains=example.org"],
                           nobodys_directory)
    assert result.returncode == 1
    assert ("smtpproxy: error: cannot listen on [127.0.0.1]:25: "
            + PRIVILEGED_ADVICE) in result.stderr
    # A port any user may bind passes.
    result = run_as_nobody(["--listen", "127.0.0.1:2525", "--check-config",
                            "-q", "-o", "allowed_domains=example.org"],
                           nobodys_directory)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="root binds port 25")
def test_check_config_as_root_takes_port_25():
    assert smtpproxy.privileged_port_advice(25) == ""
    smtpproxy.check_listening({"port": 25, "listen_ip": "127.0.0.1"})


# ---------------------------------------------------------------------------
# --check-config: the listening address and the real server
# ---------------------------------------------------------------------------

def test_check_config_refuses_an_address_this_host_lacks(tmp_path):
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is no address of a test machine.
    result = run_cli(["--listen", "192.0.2.1:2525", "--check-config", "-q"],
                     tmp_path)
    assert result.returncode == 1
    assert ("smtpproxy: error: cannot listen on [192.0.2.1]:2525: 192.0.2.1 "
            "is not an address of this host") in result.stderr


def test_check_config_refuses_a_policy_address_this_host_lacks(tmp_path):
    result = run_cli(["--policy-listen", "192.0.2.1:10023",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 1
    assert ("cannot listen for policy requests on 192.0.2.1:10023: "
            "192.0.2.1 is not an address of this host") in result.stderr


def test_check_config_passes_beside_a_service_holding_the_port(
        tmp_path, upstream):
    # Before a reload, the service holds its port: the check binds port 0.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    try:
        result = run_cli(["--listen", "127.0.0.1:%d" % held.getsockname()[1],
                          "--upstream", "127.0.0.1:%d" % upstream.port,
                          "-o", "allowed_domains=example.org",
                          "--check-config", "-q"], tmp_path)
    finally:
        held.close()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_config_warns_of_a_real_server_that_does_not_answer(tmp_path):
    port = free_port()
    result = run_cli(["--listen", "127.0.0.1:%d" % free_port(),
                      "--upstream", "127.0.0.1:%d" % port,
                      "-o", "allowed_domains=example.org",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("smtpproxy: warning: the real server at 127.0.0.1:%d does not "
            "answer: cannot connect to 127.0.0.1:%d" % (port, port)) in \
        result.stderr


def test_check_config_asks_the_real_server_for_its_ehlo(tmp_path,
                                                         raw_upstream):
    result = run_cli(["--listen", "127.0.0.1:%d" % free_port(),
                      "--upstream", "127.0.0.1:%d" % raw_upstream.port,
                      "-o", "allowed_domains=example.org",
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "does not answer" not in result.stderr
    wait_until(lambda: [command.split()[0] for command in
                        raw_upstream.commands] == [b"EHLO", b"QUIT"],
               what="the probe's EHLO and QUIT")


def test_check_config_of_the_policy_service_alone_asks_no_real_server(
        tmp_path):
    result = run_cli(["-o", "smtp_proxy=no", "--policy-listen",
                      "127.0.0.1:%d" % free_port(),
                      "--upstream", "127.0.0.1:%d" % free_port(),
                      "--check-config", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "real server" not in result.stderr
