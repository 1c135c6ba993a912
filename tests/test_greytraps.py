"""Greytraps (spamd's): a client that writes to an address that never
receives mail is answered as greylisting answers, and is trapped in the
store for greytrap_time: none of its mail passes meanwhile, on any MX
host sharing the store, and it is never auto-whitelisted.  The engine is
asked directly where no socket is needed; then real sessions through the
proxy (sqlite, and two proxies on one PostgreSQL store), the policy
service, the admin commands, and the start's refusals.  Time is the
engine's ``now``, moved by the tests: no sleeps."""

import os
import subprocess
import sys
import threading

import pytest

import smtpproxy
from conftest import HERE, ROOT, RawClient, RecordingHandler, \
    Upstream, free_port
from test_policy_service import DEFER, PolicyClient

T0 = 1000000000.0
TRAP = "spamtrap@example.org"
# Explicit timings: the defaults may change; a day's trap, as spamd's.
TIMINGS = dict(too_soon=0, min_defer_time=300, max_defer_time=25000,
               max_grey=3000000, greytrap_time=86400,
               auto_whitelist_clients=0, client_key="network",
               allowed_senders=[], allowed_domains=["example.org"])


@pytest.fixture
def traps(tmp_path):
    """The path of a greytrap_recipients file listing TRAP."""
    path = tmp_path / "greytraps"
    path.write_text("# never published as a real address\n%s\n" % TRAP)
    return str(path)


def greylister(tmp_path, traps, **keys):
    values = dict(TIMINGS, greylist_db=str(tmp_path / "traps.db"),
                  greytrap_recipients=traps)
    values.update(keys)
    return smtpproxy.Greylister(
        type("Settings", (smtpproxy.GreyListingPolicy,), values))


def decide(grey, now, recipient="b@example.org", client="192.0.2.7",
           sender="a@example.net"):
    return grey.decide(client, sender, recipient, now)


# -- the engine ---------------------------------------------------------------

def test_a_rcpt_to_a_trap_is_deferred_and_traps_the_clients_network(
        tmp_path, traps):
    grey = greylister(tmp_path, traps)
    decision = decide(grey, T0, TRAP.upper())    # compared as recipients are
    assert (decision.verdict, decision.rule, decision.key) == (
        "defer", "greytrap:hit network:192.0.2.0/24", "192.0.2.0/24")
    trapped = decide(grey, T0 + 1, client="192.0.2.200")
    assert (trapped.verdict, trapped.rule) == (
        "defer", "greytrap:trapped network:192.0.2.0/24")
    # Another network is greylisted as usual.
    assert decide(grey, T0 + 1, client="198.51.100.7").rule == \
        "network:198.51.100.0/24"


def test_a_trapped_clients_retry_is_deferred_until_the_trap_expires(
        tmp_path, traps):
    grey = greylister(tmp_path, traps, greytrap_time=3600)
    assert decide(grey, T0).rule == "network:192.0.2.0/24"   # first seen
    assert decide(grey, T0 + 10, TRAP).rule.startswith("greytrap:hit ")
    late = decide(grey, T0 + 400)                # the window was 300 s
    assert (late.verdict, late.rule) == (
        "defer", "greytrap:trapped network:192.0.2.0/24")
    # greytrap_time after the trap sprang, the triplet passes: it waited.
    passed = decide(grey, T0 + 10 + 3600)
    assert (passed.verdict, passed.delay) == ("accept", 3610)


def test_a_triplet_that_passed_before_is_deferred_while_trapped(tmp_path,
                                                                traps):
    # The pass is kept in memory (greylist_cache_time) by the process
    # that springs the trap: it must not be accepted from there.
    grey = greylister(tmp_path, traps, greylist_cache_time=600)
    decide(grey, T0)
    assert decide(grey, T0 + 300).verdict == "accept"
    assert decide(grey, T0 + 301).verdict == "accept"       # from memory
    decide(grey, T0 + 302, TRAP)
    assert decide(grey, T0 + 303).rule.startswith("greytrap:trapped ")


def test_a_trapped_client_is_never_auto_whitelisted(tmp_path, traps):
    grey = greylister(tmp_path, traps, auto_whitelist_clients=1,
                      greylist_cache_time=600)
    decide(grey, T0)
    assert decide(grey, T0 + 300).verdict == "accept"       # one pass
    trusted = decide(grey, T0 + 301, "c@example.org")
    assert trusted.rule == "auto-whitelist network:192.0.2.0/24"
    decide(grey, T0 + 302, TRAP)
    for recipient in ("c@example.org", "d@example.org"):
        assert decide(grey, T0 + 303, recipient).rule == \
            "greytrap:trapped network:192.0.2.0/24"


def test_a_name_key_and_an_unknown_client_are_trapped_too(tmp_path, traps):
    grey = greylister(tmp_path, traps, client_key="name")
    resolve = {"mx1.out.example.com": {"192.0.2.7"}}.get
    hit = grey.decide("192.0.2.7", "a@example.net", TRAP, T0,
                      hostname="mx1.out.example.com",
                      resolve=lambda name: resolve(name, set()))
    assert hit.rule == "greytrap:hit name:out.example.com"
    # The same sender pool from another network is the same client.
    retry = grey.decide("198.51.100.9", "a@example.net", "b@example.org",
                        T0 + 1, hostname="mx9.out.example.com",
                        resolve=lambda name: set())
    assert retry.rule == "greytrap:trapped name:out.example.com"
    unknown = decide(grey, T0, TRAP, client=smtpproxy.UNKNOWN_CLIENT)
    assert unknown.rule == "greytrap:hit unknown-client"
    assert decide(grey, T0 + 1, client=smtpproxy.UNKNOWN_CLIENT).rule == \
        "greytrap:trapped unknown-client"


def test_the_administrators_whitelists_come_before_the_traps(tmp_path,
                                                             traps):
    clients = tmp_path / "clients"
    clients.write_text("192.0.2.0/24\n")
    grey = greylister(tmp_path, traps, whitelist_clients=str(clients))
    assert decide(grey, T0, TRAP).rule == "whitelist_clients"
    relay = greylister(tmp_path, traps, allowed_senders=["192.0.2.7"])
    assert decide(relay, T0, TRAP).verdict == "relay"


def test_a_trap_is_deferred_even_when_the_store_fails(tmp_path, traps):
    grey = greylister(tmp_path, traps, greylist_fail_mode="accept",
                      greylist_db=str(tmp_path / "no-such-dir" / "x.db"))
    decision = decide(grey, T0, TRAP)
    assert decision.verdict == "defer" and decision.error is not None
    assert decide(grey, T0).rule == "store-failed"      # accepted


def test_expired_traps_are_purged_and_a_lifted_trap_frees_the_client(
        tmp_path, traps):
    grey = greylister(tmp_path, traps, greytrap_time=3600)
    decide(grey, T0, TRAP)
    store = smtpproxy.stores.get(grey.settings)
    [(client, sprung, until, recipient)] = store.traps()
    assert (client, sprung, until, recipient) == (
        "192.0.2.0/24", T0, T0 + 3600, TRAP)
    assert store.purge(T0 + 3599) == 0
    assert store.purge(T0 + 3601) == 1 and store.traps() == []
    decide(grey, T0 + 4000, TRAP)
    assert store.delete("192.0.2.0/24") is True
    assert decide(grey, T0 + 4001).rule == "network:192.0.2.0/24"


# -- real sessions ------------------------------------------------------------

def rcpt(port, recipient, source="127.0.0.2"):
    """One session from ``source``: the reply to RCPT, (code, text)."""
    client = RawClient(port, source=source)
    try:
        client.cmd("EHLO client.example.net")
        client.cmd("MAIL FROM:<a@example.net>")
        return client.cmd("RCPT TO:<%s>" % recipient)
    finally:
        client.cmd("QUIT")
        client.close()


def test_a_trap_and_the_trapped_retry_are_answered_as_greylisting(
        proxy, tmp_path, traps):
    clock = [T0]
    keys = dict(TIMINGS, greylist_db=str(tmp_path / "proxy.db"),
                greytrap_recipients=traps, now=lambda self: clock[0])
    port = proxy(handler=smtpproxy.GreyListingPolicy, **keys)
    greylisted = rcpt(port, "b@example.org")
    assert greylisted == (451, "4.7.1 Greylisted, please try again later")
    clock[0] = T0 + 10
    assert rcpt(port, TRAP) == greylisted
    clock[0] = T0 + 400                         # after the 300 s window
    assert rcpt(port, "b@example.org") == greylisted
    assert rcpt(port, "b@example.org", source="127.0.0.3") == greylisted
    clock[0] = T0 + 10 + 86400 + 1              # the trap expired
    assert rcpt(port, "b@example.org")[0] == 451    # waited too long
    clock[0] = T0 + 86411 + 300
    assert rcpt(port, "b@example.org")[0] == 250


def test_a_trap_sprung_through_one_mx_defers_the_client_on_the_other(
        proxy, pg_uri, traps, monkeypatch):
    """Two proxies on one PostgreSQL store (two store objects, two
    connections: as two MX hosts), the clock the tests' on both."""
    monkeypatch.setattr(smtpproxy.PostgreSQLStore, "database_clock", False)
    clock = [T0]
    ports = [proxy(handler=smtpproxy.GreyListingPolicy,
                   **dict(TIMINGS, greylist_db=pg_uri, greytrap_time=3600,
                          greytrap_recipients=traps, greylist_db_timeout=2
                          + number, greylist_cache_time=60,
                          now=lambda self: clock[0]))
             for number in (0, 1)]
    a, b = ports
    assert rcpt(a, "b@example.org")[0] == 451
    assert rcpt(b, "c@example.org")[0] == 451
    clock[0] = T0 + 300
    assert rcpt(b, "c@example.org")[0] == 250    # passed, kept by b
    clock[0] = T0 + 301
    assert rcpt(a, TRAP)[0] == 451
    # b learns of it once its memory of the client is older than
    # greylist_cache_time (60 s): at most that late.
    clock[0] = T0 + 400
    assert rcpt(b, "b@example.org")[0] == 451    # after the window
    assert rcpt(b, "c@example.org")[0] == 451    # passed before
    assert rcpt(a, "c@example.org")[0] == 451
    clock[0] = T0 + 301 + 3600 + 1
    assert rcpt(b, "c@example.org")[0] == 250
    assert rcpt(a, "b@example.org")[0] == 250


def test_the_policy_service_traps_too(tmp_path, traps):
    clock = [T0]
    settings = type("Settings", (smtpproxy.GreyListingPolicy,), dict(
        TIMINGS, greylist_db=str(tmp_path / "policy.db"),
        greytrap_recipients=traps))
    handler = type("Clocked", (smtpproxy.PolicyHandler,),
                   {"now": lambda self: clock[0]})
    server = smtpproxy.PolicyServer(("127.0.0.1", 0), settings, handler)
    threading.Thread(target=server.serve_forever,
                     kwargs={"poll_interval": 0.05}, daemon=True).start()
    client = PolicyClient(server)
    try:
        assert client.ask() == DEFER                    # first seen
        assert client.ask(recipient=TRAP) == DEFER      # the same answer
        clock[0] = T0 + 400
        assert client.ask() == DEFER                    # trapped
        clock[0] = T0 + 86400 + 1
        assert client.ask() == DEFER                    # waited too long
        clock[0] = T0 + 86400 + 301
        assert client.ask() == "DUNNO"
    finally:
        client.sock.close()
        server.shutdown()
        server.close_connections()
        server.server_close()


# -- the admin commands and the start -----------------------------------------

def run(tmp_path, config, *args):
    (tmp_path / "traps.conf").write_text(config)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--config", str(tmp_path / "traps.conf")] + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=str(tmp_path), universal_newlines=True, timeout=60)
    return process.returncode, process.stdout, process.stderr


def test_db_list_shows_a_trap_and_db_delete_lifts_it(tmp_path, traps):
    grey = greylister(tmp_path, traps)
    decide(grey, T0, TRAP)
    smtpproxy.reset_registries()
    config = "greylist_db = %s\n" % (tmp_path / "traps.db")
    code, out, _ = run(tmp_path, config, "--db-list")
    assert code == 0
    assert ("TRAPPED 192.0.2.0/24 | 2001-09-09T01:46:40Z | "
            "2001-09-10T01:46:40Z | <%s>" % TRAP) in out.splitlines()
    code, out, _ = run(tmp_path, config, "--db-delete", "192.0.2.0/24")
    assert (code, out.strip()) == (0, "deleted 192.0.2.0/24")
    code, out, _ = run(tmp_path, config, "--db-list")
    assert "TRAPPED" not in out
    assert decide(grey, T0 + 1).rule == "network:192.0.2.0/24"


def config_with(traps, *lines):
    return ("allowed_senders:\nallowed_domains:\n    example.org\n"
            "greytrap_recipients = %s\n" % traps + "".join(
                line + "\n" for line in lines))


@pytest.mark.parametrize("why, lines, words", [
    ("a whitelisted recipient",
     ["whitelist_recipients = recipients"], ["whitelist_recipients"]),
    ("a whitelisted triple",
     ["whitelisted_triples:",
      "    192.0.2.7 <a@example.net> <%s>" % TRAP.upper()],
     ["whitelisted_triples"]),
    ("outside allowed_domains",
     ["allowed_domains:", "    example.com"], ["allowed_domains"]),
])
def test_the_start_and_check_config_refuse_a_trap_that_is_a_real_recipient(
        tmp_path, traps, why, lines, words):
    (tmp_path / "recipients").write_text("example.org\n")
    config = config_with(traps, *lines)
    for args in (["--check-config", "-o", "run_as_root=yes"],
                 ["--listen", "127.0.0.1:%d" % free_port(), "-o",
                  "run_as_root=yes", "-o", "greylist_log=", "-o",
                  "pidfile="]):
        code, _, err = run(tmp_path, config, *args)
        assert code == 2, (why, args, err)
        assert TRAP in err.lower() and "greytrap_recipients" in err, err
        for word in words:
            assert word in err, err


class MailboxesOnly(RecordingHandler):
    """A real server that takes only its ``mailboxes`` as recipients (550
    5.1.1 for the others), or every recipient (a catch-all)."""

    def __init__(self, mailboxes, catch_all=False):
        RecordingHandler.__init__(self)
        self.mailboxes, self.catch_all = mailboxes, catch_all

    async def handle_RCPT(self, server, session, envelope, address,
                          rcpt_options):
        self.commands.append(("RCPT", address))
        if self.catch_all or address.lower() in self.mailboxes:
            return "250 2.1.5 Ok"
        return "550 5.1.1 <%s>: Recipient address rejected" % address


def start_args():
    return ["--listen", "127.0.0.1:%d" % free_port(), "-o",
            "run_as_root=yes", "-o", "greylist_log=", "-o", "pidfile="]


def test_the_start_and_check_config_refuse_a_trap_the_real_server_takes(
        tmp_path, traps):
    upstream = Upstream(MailboxesOnly({TRAP, "bob@example.org"}))
    try:
        config = config_with(traps, "smtp_port = %d" % upstream.port)
        for args in (["--check-config", "-o", "run_as_root=yes"],
                     start_args()):
            code, _, err = run(tmp_path, config, *args)
            assert code == 2, (args, err)
            assert ("greytrap_recipients %s: %s is a mailbox: the real "
                    "server 127.0.0.1:%d accepts it" % (
                        traps, TRAP, upstream.port)) in err, err
        # Asked without a message: MAIL FROM:<>, a RCPT, no DATA.
        assert ("RCPT", TRAP) in upstream.handler.commands
        assert not upstream.handler.messages
    finally:
        upstream.stop()


def test_a_catch_all_real_server_cannot_say_and_is_a_warning(tmp_path,
                                                             traps):
    upstream = Upstream(MailboxesOnly(set(), catch_all=True))
    try:
        config = config_with(traps, "smtp_port = %d" % upstream.port)
        code, _, err = run(tmp_path, config, "--check-config", "-o",
                           "run_as_root=yes")
        assert code == 0, err
        assert ("accepts any recipient of example.org (a catch-all), so "
                "it cannot say whether a trap there is a mailbox") in err
        # It was asked for an address nobody has, besides the trap.
        probes = [command[1] for command in upstream.handler.commands
                  if command[0] == "RCPT"]
        assert probes[0] == TRAP and len(probes) == 2
        assert probes[1].startswith("smtpproxy-probe-")
    finally:
        upstream.stop()


def test_traps_the_real_server_refuses_are_accepted(tmp_path, traps):
    upstream = Upstream(MailboxesOnly({"bob@example.org"}))
    try:
        config = config_with(traps, "smtp_port = %d" % upstream.port)
        code, _, err = run(tmp_path, config, "--check-config", "-o",
                           "run_as_root=yes")
        assert code == 0 and "greytrap" not in err, err
        assert ("RCPT", TRAP) in upstream.handler.commands
    finally:
        upstream.stop()


def test_a_missing_greytrap_file_stops_the_start(tmp_path):
    config = config_with(str(tmp_path / "none"))
    code, _, err = run(tmp_path, config, "--listen",
                       "127.0.0.1:%d" % free_port(), "-o", "run_as_root=yes",
                       "-o", "greylist_log=", "-o", "pidfile=")
    assert code == 2
    assert "greytrap_recipients %s: " % (tmp_path / "none") in err
    code, _, err = run(tmp_path, config, "--check-config", "-o",
                       "run_as_root=yes")
    assert code == 2 and "greytrap_recipients" in err, err


def test_check_config_accepts_traps_of_our_domains(tmp_path, traps):
    code, out, err = run(tmp_path, config_with(traps), "--check-config",
                         "-o", "run_as_root=yes")
    assert code == 0, err
    assert "greytrap_recipients = %s" % traps in out.splitlines()
    assert "greytrap_time = 86400" in out.splitlines()


def test_a_postgresql_store_of_schema_version_1_gets_its_traps_table(
        pg_uri, postgresql):
    """The tables as smtpproxy made them before greytraps: migrated to
    version 2 at the first use, the triplets kept."""
    name = pg_uri.rsplit("/", 1)[1]
    postgresql.sql(
        "SET ROLE greylist;"        # the store's user owns its tables
        " CREATE TABLE smtpproxy_schema (version integer NOT NULL,"
        " last_purge double precision);"
        " CREATE TABLE smtpproxy_triplets (key text PRIMARY KEY,"
        " first_seen double precision NOT NULL,"
        " last_seen double precision NOT NULL, passed double precision,"
        " passes integer NOT NULL DEFAULT 0);"
        " CREATE TABLE smtpproxy_clients (network text PRIMARY KEY,"
        " passes integer NOT NULL, last_seen double precision NOT NULL);"
        " INSERT INTO smtpproxy_schema (version) VALUES (1);"
        " INSERT INTO smtpproxy_triplets (key, first_seen, last_seen)"
        " VALUES ('k', %d, %d)" % (T0, T0), name)
    store = type("Store", (smtpproxy.PostgreSQLStore,),
                 {"database_clock": False})(pg_uri)
    store.spring_trap("192.0.2.0/24", T0, TRAP)
    assert store.client_is_trapped("192.0.2.0/24", T0 + 1)
    assert postgresql.sql("SELECT version FROM smtpproxy_schema", name) == "2"
    assert [entry[1] for entry in store.entries()] == ["k"]
    store.close()
