"""The PostgreSQL store as a shared greylist: several proxy processes on
one database (as several MX hosts), concurrent decisions, the database
going away and coming back, clocks that differ, the admin commands and
--check-config.  The database is a private cluster (tests/pg.py).  The
store's decision table is tested on both stores by tests/test_store.py."""

import os
import smtplib
import subprocess
import sys
import threading
import time

import pytest

import smtpproxy
from conftest import (PG_DRIVERS, ROOT, ProxyProcess, free_port, read,
                      wait_until)

SENDERS = ["%s@example.net" % name
           for name in ("alice", "bob", "carol", "dave", "erin")]


def config(uri, **keys):
    """A greylisting configuration on ``uri``: example.org's, no client
    allowed, keyed by network (no DNS), a one-second delay, no
    auto-whitelist, fail mode defer, two seconds for the store (for the
    connection, on a busy CI machine)."""
    values = {"greylist_db": uri, "too_soon": 0, "min_defer_time": 1,
              "max_defer_time": 3600, "auto_whitelist_clients": 0,
              "client_key": "network", "greylist_fail_mode": "defer",
              "greylist_db_timeout": 2}
    values.update(keys)
    return ("allowed_senders:\nallowed_domains:\n    example.org\n"
            + "".join("%s = %s\n" % item for item in values.items()))


def start(tmp_path, name, upstream, uri, handler=None, **keys):
    directory = tmp_path / name
    directory.mkdir()
    return ProxyProcess(directory, upstream.port, config=config(uri, **keys),
                        handler=handler)


def rcpt(proxy, sender=SENDERS[0], recipient="user@example.org"):
    """One session: the reply code to RCPT."""
    client = smtplib.SMTP("127.0.0.1", proxy.port, timeout=30)
    try:
        client.ehlo("client.example.net")
        client.mail(sender)
        return client.rcpt(recipient)[0]
    finally:
        client.close()


@pytest.fixture
def proxies(tmp_path, upstream):
    started = []

    def make(uri, name, handler=None, **keys):
        proxy = start(tmp_path, name, upstream, uri, handler, **keys)
        started.append(proxy)
        upstream.forget_probe(proxy.probes)
        return proxy
    yield make
    for proxy in started:
        proxy.stop()


def test_deferred_by_one_host_accepted_by_the_other(proxies, pg_uri):
    first, second = proxies(pg_uri, "mx1"), proxies(pg_uri, "mx2")
    assert rcpt(first) == 451
    assert rcpt(second) == 451          # too soon: min_defer_time is 1 s
    time.sleep(1.1)                     # greylisting's delay, not a poll
    assert rcpt(second) == 250
    assert rcpt(first) == 250           # and the pass is known to both


def test_each_worker_connects_to_the_store_at_its_start(proxies, pg_uri,
                                                        postgresql):
    # Before any mail: the first RCPT does not wait for the connection.
    proxies(pg_uri, "mx1", workers=2)
    wait_until(lambda: postgresql.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
        " 'smtpproxy' AND datname = '%s'" % pg_uri.rsplit("/", 1)[1]) == "2",
        what="both workers to connect")


def test_two_processes_fifty_sessions_give_serial_results(proxies, pg_uri):
    # Every pass counted: nothing kept in memory.
    hosts = [proxies(pg_uri, "mx1", greylist_cache_time=0),
             proxies(pg_uri, "mx2", greylist_cache_time=0)]

    def wave():
        codes = []
        lock = threading.Lock()

        def session(number):
            code = rcpt(hosts[number % 2], SENDERS[number % 5])
            with lock:
                codes.append(code)
        threads = [threading.Thread(target=session, args=(n,))
                   for n in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return sorted(codes)

    # 25 sessions per process, 10 per triplet, at once: every first
    # sighting is deferred, and there is one row per triplet.
    assert wave() == [451] * 50
    store = smtpproxy.PostgreSQLStore(pg_uri)
    assert store.stats() == {"GREY": 5, "WHITE": 0, "CLIENT": 0}
    time.sleep(1.1)
    # After the delay: every retry accepted, every pass counted once; the
    # client's five greylisting passes, within an hour, count as one.
    assert wave() == [250] * 50
    entries = list(store.entries())
    assert [(state, passes) for state, _, _, _, passes in entries] == (
        [("WHITE", 10)] * 5 + [("CLIENT", 1)])
    store.close()


def test_clocks_that_differ_do_not_change_decisions(proxies, pg_uri):
    # One host's clock is two hours fast: the store keeps the database's
    # time, so the slow host's retry is in the window all the same.
    fast = proxies(pg_uri, "fast", handler="plainproxy.FastClock")
    slow = proxies(pg_uri, "slow")
    assert rcpt(fast) == 451
    time.sleep(1.1)
    assert rcpt(slow) == 250
    assert rcpt(fast, SENDERS[1]) == 451
    time.sleep(1.1)
    assert rcpt(fast, SENDERS[1]) == 250
    # The times stored are the database's, now, not two hours ahead.
    store = smtpproxy.PostgreSQLStore(pg_uri)
    for _, _, first, last, _ in store.entries():
        assert abs(last - time.time()) < 60
    store.close()


def test_database_stopped_and_started_under_load(proxies, pg_uri,
                                                 postgresql):
    # Passes not kept in memory: every RCPT asks the store; one process,
    # whose outage is logged once.
    proxy = proxies(pg_uri, "mx1", greylist_cache_time=0, workers=1)
    # Pass the senders' triplets: with the store, they are accepted.
    store = smtpproxy.PostgreSQLStore(pg_uri)
    for sender in SENDERS:
        store.pass_key("127.0.0.0/24 %s user@example.org" % sender, 0)
    store.close()
    results = []                        # (time, code)
    stop = threading.Event()

    def client(number):
        while not stop.is_set():
            began = time.monotonic()
            results.append((began, rcpt(proxy, SENDERS[number % 5])))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(results) > 20, what="load")
        down = time.monotonic()
        postgresql.stop()
        wait_until(lambda: any(code == 451 and began > down
                               for began, code in results),
                   what="the fail mode")
        time.sleep(2)                   # the outage lasts a while
        up = time.monotonic()
        postgresql.start()
        wait_until(lambda: any(code == 250 and began > up + 0.01
                               for began, code in results), timeout=40,
                   what="service to resume")
        resumed = len(results)
        wait_until(lambda: len(results) > resumed + 20, what="more load")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert proxy.process.poll() is None
    during = [code for began, code in results if down + 0.5 < began < up]
    assert during and set(during) == {451}     # greylist_fail_mode = defer
    assert [code for _, code in results[-20:]] == [250] * 20
    log = proxy.stderr_text()
    assert log.count("usable again") == 1
    fallbacks = [line for line in log.splitlines()
                 if "decisions fall back to defer" in line]
    # Each distinct error once, not once per session.
    assert 1 <= len(fallbacks) <= 3 < len(during)
    assert len(set(fallbacks)) == len(fallbacks)
    assert "secret" not in log


def test_passes_kept_in_memory_are_accepted_while_the_database_is_down(
        pg_uri, postgresql):
    store = type("S", (smtpproxy.PostgreSQLStore,), {
        "greylist_cache_time": 60, "database_clock": False,
        "greylist_db_timeout": 1})(pg_uri)
    store.decide("k", 0)
    assert store.decide("k", 3600) is True
    postgresql.stop()
    try:
        assert store.check("k", 3630) == (True, None)
        with pytest.raises(smtpproxy.StoreError):
            store.check("new", 3630)
        # Past the cache time, the store is asked: it is down.
        with pytest.raises(smtpproxy.StoreError):
            store.check("k", 3660 + 1)
    finally:
        postgresql.start()
    store.close()


def test_a_connection_the_server_closed_is_replaced_at_once(pg_uri,
                                                          postgresql):
    store = smtpproxy.PostgreSQLStore(pg_uri)
    assert store.decide("k", 0) is False
    postgresql.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'smtpproxy'")
    assert store.decide("k2", 0) is False       # no error, no fail mode
    assert store.failing is None
    assert store.stats()["GREY"] == 2
    store.close()


@pytest.fixture
def driver_connection(pg_uri):
    module = smtpproxy.postgresql_driver()
    connection = module.connect(pg_uri)
    yield connection
    connection.close()


def test_a_decision_waits_at_most_greylist_db_timeout(pg_uri,
                                                      driver_connection):
    class Quick(smtpproxy.PostgreSQLStore):
        greylist_db_timeout = 1
    store = Quick(pg_uri)
    store.decide("locked", 0)

    def timed(key):
        began = time.monotonic()
        with pytest.raises(smtpproxy.StoreError) as caught:
            store.decide(key, 0)
        return str(caught.value), time.monotonic() - began
    # Another transaction holds the triplet's row: the statement ends.
    cursor = driver_connection.cursor()
    cursor.execute("SELECT * FROM smtpproxy_triplets WHERE key = 'locked'"
                   " FOR UPDATE")
    text, seconds = timed("locked")
    assert "statement timeout" in text, text
    driver_connection.rollback()
    # Another decision of this process is stuck in the database: the
    # wait for the turn ends.
    store._lock.acquire()
    try:
        text, seconds = timed("other")
    finally:
        store._lock.release()
    assert "no turn within greylist_db_timeout (1 s)" in text, text
    assert seconds > 0.9
    assert store.decide("other", 0) is False    # and it works again
    store.close()


def test_statements_after_a_wait_may_take_only_what_is_left(
        pg_uri, postgresql, driver_connection):
    class Quick(smtpproxy.PostgreSQLStore):
        greylist_db_timeout = 1
    store = Quick(pg_uri)
    store.decide("locked", 0)
    cursor = driver_connection.cursor()
    cursor.execute("SELECT * FROM smtpproxy_triplets WHERE key = 'locked'"
                   " FOR UPDATE")
    failures = []

    def decide():
        try:
            store.decide("locked", 0)
        except smtpproxy.StoreError as error:
            failures.append(str(error))
    # The decision waits for its turn (another of this process holds it)
    # a while, then for the row: its statement has the rest of its second.
    store._lock.acquire()
    thread = threading.Thread(target=decide)
    thread.start()
    time.sleep(0.3)                 # a part of its budget goes by
    store._lock.release()
    query = wait_until(lambda: postgresql.sql(
        "SELECT query FROM pg_stat_activity WHERE application_name ="
        " 'smtpproxy' AND wait_event_type = 'Lock'",
        pg_uri.rsplit("/", 1)[1]), what="the decision to wait for the row")
    thread.join()
    driver_connection.rollback()
    left = int(query.split("SET LOCAL statement_timeout = ")[1].split(";")[0])
    assert 0 < left <= 700, query
    assert len(failures) == 1 and "statement timeout" in failures[0], failures
    assert store.decide("other", 0) is False
    store.close()


def test_an_outage_is_one_error_then_fails_fast_then_recovers(pg_uri,
                                                              postgresql):
    class Quick(smtpproxy.PostgreSQLStore):
        greylist_db_timeout = 1
        retry_min = 0.2
    store = Quick(pg_uri)
    assert store.decide("k", 0) is False
    postgresql.stop()
    try:
        marks = []
        for _ in range(5):
            with pytest.raises(smtpproxy.StoreError) as caught:
                store.decide("k", 0)
            marks.append(caught.value.first_of_incident)
        assert marks.count(True) <= 2
        assert marks[0] is True
    finally:
        postgresql.start()
    wait_until(lambda: _works(store), timeout=20, what="the store")
    assert store.failing is None
    store.close()


def _works(store):
    try:
        store.decide("k", 0)
        return True
    except smtpproxy.StoreError:
        return False


def test_expired_entries_are_purged_by_one_instance_per_interval(pg_uri):
    class Store(smtpproxy.PostgreSQLStore):
        database_clock = False
        purge_interval = 100
    first, second = Store(pg_uri), Store(pg_uri)
    t0 = 1e9

    def keys():
        return [entry[1] for entry in second.entries()]
    second.decide("old", t0)                    # second purges, at t0
    first.decide("a", t0 + 25010)               # first's first: purges
    assert keys() == ["a"]
    second.decide("older", t0 - 100)
    # Due for second (150 s since its purge), not for the database (40 s
    # since first's): no purge, though "older" has expired.
    second.decide("b", t0 + 25050)
    assert "older" in keys()
    second.decide("b", t0 + 25200)
    assert "older" not in keys()
    first.close()
    second.close()


def test_a_purge_in_progress_elsewhere_is_not_waited_for(pg_uri,
                                                         driver_connection):
    store = smtpproxy.PostgreSQLStore(pg_uri)
    store.decide("k", 0)
    cursor = driver_connection.cursor()
    cursor.execute("SELECT pg_advisory_lock(%d)"
                   % smtpproxy.PostgreSQLStore._PURGE_LOCK)
    driver_connection.commit()
    store.last_purge = None             # a purge is due
    # Waiting for the lock, still held, would have ended in the statement
    # timeout: a StoreError, and the store failing.
    assert store.decide("k2", 0) is False
    assert store.failing is None
    store.close()


def test_the_schema_is_made_once_and_versioned(pg_uri, postgresql):
    name = pg_uri.rsplit("/", 1)[1]
    stores = [smtpproxy.PostgreSQLStore(pg_uri) for _ in range(8)]
    threads = [threading.Thread(target=store.decide, args=("k", 0))
               for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [store.failing for store in stores] == [None] * 8
    assert postgresql.sql("SELECT version FROM smtpproxy_schema", name) == "2"
    postgresql.sql("UPDATE smtpproxy_schema SET version = 3", name)
    later = smtpproxy.PostgreSQLStore(pg_uri)
    with pytest.raises(smtpproxy.StoreError) as caught:
        later.decide("k", 0)
    assert "schema version 3, newer than this smtpproxy's (2)" in str(
        caught.value)
    for store in stores + [later]:
        store.close()


def test_tables_made_by_the_administrator_need_no_create_right(pg_uri,
                                                               postgresql):
    name = pg_uri.rsplit("/", 1)[1]
    smtpproxy.PostgreSQLStore(pg_uri).stats()       # makes the tables
    postgresql.sql("CREATE ROLE mx2 LOGIN PASSWORD 'mx2'; GRANT SELECT, "
                   "INSERT, UPDATE, DELETE ON smtpproxy_schema, "
                   "smtpproxy_triplets, smtpproxy_clients, smtpproxy_traps,"
                   " smtpproxy_expired TO mx2", name)
    try:
        store = smtpproxy.PostgreSQLStore(
            pg_uri.replace("greylist:secret@", "mx2:mx2@"))
        assert store.decide("k", 0) is False
        store.close()
    finally:
        postgresql.sql("DROP OWNED BY mx2; DROP ROLE mx2", name)


def test_a_local_socket_uri(postgresql, pg_uri):
    name = pg_uri.rsplit("/", 1)[1]
    store = smtpproxy.PostgreSQLStore(postgresql.socket_uri(name))
    assert store.decide("k", 0) is False
    store.close()


@pytest.mark.parametrize("synchronous", [False, True])
def test_commits_wait_for_the_disk_only_when_asked(pg_uri, synchronous):
    store = type("S", (smtpproxy.PostgreSQLStore,),
                 {"synchronous_commit": synchronous})(pg_uri)
    store.stats()
    cursor = store._db.cursor()
    cursor.execute("SHOW synchronous_commit")
    assert cursor.fetchone()[0] == ("on" if synchronous else "off")
    cursor.execute("SHOW statement_timeout")
    assert cursor.fetchone()[0] == "5s"     # greylist_db_timeout
    cursor.close()
    store.close()


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_each_driver_is_used_when_asked(pg_uri, driver):
    store = type("S", (smtpproxy.PostgreSQLStore,), {"driver": driver})(
        pg_uri)
    assert store._module.__name__ == driver
    assert store.decide("k", 0) is False
    store.close()


def test_the_password_is_never_shown():
    redact = smtpproxy.redact_uri
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgres://u:p%40w@h/db?sslmode=require") == (
        "postgres://u:***@h/db?sslmode=require")
    assert redact("postgresql:///db?host=/run&password=pw&x=1") == (
        "postgresql:///db?host=/run&password=***&x=1")
    assert redact("greylist.db") == "greylist.db"


@pytest.mark.parametrize("password", [
    "S3c?ret", "S3c@ret", "S3c/ret", "S3c#ret", "S3c%zzret", "S3c:ret"])
def test_a_password_libpq_reads_otherwise_is_hidden_whole(password):
    # libpq ends the password at the first "@" (before any "/"): the
    # redaction ends it at the last, so that no piece of it shows.
    uri = "postgresql://greylist:%s@db.example.org:5432/grey" % password
    assert smtpproxy.redact_uri(uri) == (
        "postgresql://greylist:***@db.example.org:5432/grey")
    query = "postgresql:///grey?password=%s&host=/run" % password
    assert smtpproxy.redact_uri(query) == (
        "postgresql:///grey?password=***&host=/run")


def test_a_driver_message_is_shown_without_the_password():
    hide = smtpproxy.hide_secrets
    uri = "postgresql://greylist:S3cret%zzPW@127.0.0.1:5/grey"
    # libpq quotes the token it cannot decode, or the whole URI.
    assert hide('invalid percent-encoded token: "S3cret%zzPW"', uri) == (
        'invalid percent-encoded token: "***"')
    assert hide('no "]" in URI: "%s"' % uri, uri) == (
        'no "]" in URI: "postgresql://greylist:***@127.0.0.1:5/grey"')
    # A piece of a password libpq took for the host; the decoded form; a
    # keyword/value conninfo.
    uri = "postgresql://greylist:S3c@ret@db.example.org/grey"
    assert hide("failed to resolve host 'ret@db.example.org'", uri) == (
        "failed to resolve host '***'")
    uri = "postgresql://greylist:p%40ssw0rd@h/grey"
    assert hide("user=greylist password=p@ssw0rd host=h: p@ssw0rd", uri) == (
        "user=greylist password=*** host=h: ***")


@pytest.mark.parametrize("message, sqlstate", [
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'password authentication failed for user "greylist"', "28P01"),
    ('connection to server on socket "/run/postgresql/.s.PGSQL.5432" '
     'failed: FATAL:  Peer authentication failed for user "greylist"',
     "28000"),
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'no pg_hba.conf entry for host "192.0.2.7", user "greylist", '
     'database "greylist", no encryption', "28000"),
    ('connection failed: connection to server at "h" (192.0.2.1), port '
     '5432 failed: FATAL:  database "nosuch" does not exist', "3D000"),
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'permission denied for database "greylist"\nDETAIL:  User does not '
     'have CONNECT privilege.', "42501"),
    # Outages: the server away, starting, full.
    ('connection to server at "h" (192.0.2.1), port 5432 failed: '
     'Connection refused\n\tIs the server running on that host and '
     'accepting TCP/IP connections?', None),
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'the database system is starting up', None),
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'sorry, too many clients already', None),
    # The server's own words, in another language: not understood.
    ('connection to server at "h" (192.0.2.1), port 5432 failed: FATAL:  '
     'Passwort-Authentifizierung f\u00fcr Benutzer \u00bbgreylist\u00ab '
     'fehlgeschlagen', None),
    # A database named like a refusal, in a message of libpq's own.
    ('could not translate host name "database "x" does not exist" to '
     'address', None),
])
def test_a_refusal_of_the_server_is_known_by_its_message(message, sqlstate):
    # libpq gives no SQLSTATE for a connection that failed: the server's
    # part of its message follows the severity and two spaces.
    assert smtpproxy._server_refusal(message) == sqlstate


# -- the command line -------------------------------------------------------

BLOCK_DRIVERS = ("import sys; sys.modules['psycopg'] = None; "
                 "sys.modules['psycopg2'] = None; ")


def run(tmp_path, uri, *args, **options):
    """smtpproxy's command line on ``uri`` (and ``args``): its exit
    status, standard output and error.  ``no_driver``: as if none were
    installed; ``driver``: with that one only; ``prelude``: code run
    first; ``python``: the interpreter, if not this one."""
    blocked = options.get("prelude", "")
    if options.get("no_driver"):
        blocked = BLOCK_DRIVERS
    elif options.get("driver"):
        other = {"psycopg": "psycopg2", "psycopg2": "psycopg"}
        blocked = ("import sys; sys.modules[%r] = None; "
                   % other[options["driver"]])
    code = ("import sys; sys.path.insert(0, %r); %s import smtpproxy; "
            "sys.exit(smtpproxy.main(sys.argv[1:]))" % (ROOT, blocked))
    (tmp_path / "pg.conf").write_text(config(uri) + "run_as_root = yes\n")
    try:
        result = subprocess.run(
            [options.get("python", sys.executable), "-c", code, "--config",
             str(tmp_path / "pg.conf")] + list(args),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, cwd=str(tmp_path), timeout=30)
    except subprocess.TimeoutExpired as expired:
        # A start that should have failed serves: it was killed.
        return "still running", expired.stdout, expired.stderr
    return result.returncode, result.stdout, result.stderr


def test_check_config_says_the_store_is_usable(tmp_path, pg_uri):
    code, out, err = run(tmp_path, pg_uri, "--check-config")
    assert code == 0, err
    assert "# greylisting store postgresql://greylist:***@127.0.0.1:" in out
    assert ": usable (psycopg" in out
    assert "secret" not in out + err
    assert "greylist_db = postgresql://greylist:***@" in out


def test_check_config_warns_of_a_database_that_is_down(tmp_path, pg_uri,
                                                       postgresql):
    postgresql.stop()
    try:
        code, out, err = run(tmp_path, pg_uri, "--check-config")
    finally:
        postgresql.start()
    assert code == 0
    assert "is not usable now" in err
    assert "decisions fall back to greylist_fail_mode (defer)" in err
    assert "secret" not in out + err


def start_args():
    """The command line of a start that serves in the foreground."""
    return ["--listen", "127.0.0.1:%d" % free_port(),
            "--upstream", "127.0.0.1:9"]


def written(tmp_path, result):
    """All that a run wrote: its output, and the files it made (the
    configuration, which holds the URI, aside)."""
    code, out, err = result
    files = [path.read_text(errors="replace") for path in tmp_path.iterdir()
             if path.is_file() and path.name != "pg.conf"]
    return "\n".join([out, err] + files)


# A password that holds every character a URI reserves, and the URI
# that writes it: "?" and "#" as they are (libpq reads them so), "@", "/"
# and "%" percent-encoded.
SPECIAL, SPECIAL_WRITTEN = "Q9?x@Y#z/W%v", "Q9?x%40Y#z%2FW%25v"
SPECIAL_PIECES = ["Q9?x", "Y#z", "W%v", "%40Y", "z%2FW"]


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_a_password_with_reserved_characters_is_never_shown(
        tmp_path, postgresql, driver):
    uri = postgresql.login(SPECIAL, SPECIAL_WRITTEN)
    results = [run(tmp_path, uri, "--check-config", driver=driver),
               run(tmp_path, uri, "--db-stats", driver=driver),
               run(tmp_path, uri, "--db-pass", "192.0.2.7", "a@example.net",
                   "b@example.org", driver=driver)]
    for code, out, err in results:
        assert code == 0, err
    assert ": usable (%s)" % driver in results[0][1]
    assert "greylist_db = postgresql://%s:***@127.0.0.1:" % (
        uri.split("//")[1].split(":")[0]) in results[0][1]
    for result in results:
        text = written(tmp_path, result)
        for piece in SPECIAL_PIECES:
            assert piece not in text, (piece, text)


@pytest.mark.parametrize("driver", PG_DRIVERS)
@pytest.mark.parametrize("password, problem", [
    ("S3cret%zzPW", "libpq cannot read this URI: invalid percent-encoded "
                    'token: "***"'),
    ("S3cret@zzPW", 'its host name holds "@"'),
    ("S3cret/zzPW", "its port is not a number"),
])
@pytest.mark.parametrize("command", ["--check-config", "start", "--db-stats"])
def test_a_uri_that_can_never_work_is_a_configuration_error(
        tmp_path, postgresql, driver, password, problem, command):
    # The server runs, and would take the password percent-encoded: the
    # URI is wrong, not the database away.
    uri = postgresql.uri("greylist1", password=password)
    args = start_args() if command == "start" else [command]
    result = run(tmp_path, uri, *args, driver=driver)
    code, out, err = result
    assert code == 2, err
    assert problem in err
    assert "postgresql://greylist:***@127.0.0.1:%d/greylist1" % (
        postgresql.port) in err
    text = written(tmp_path, result)
    assert "S3cret" not in text and "zzPW" not in text, text


@pytest.mark.parametrize("driver", PG_DRIVERS)
@pytest.mark.parametrize("case, cause", [
    ("wrong password", "password authentication failed for user "
                       '"greylist" (SQLSTATE 28P01: the server refuses the '
                       "login"),
    ("no such database", 'database "nosuch" does not exist (SQLSTATE '
                         "3D000: no such database"),
    ("no such role", 'password authentication failed for user "nosuch" '
                     "(SQLSTATE 28P01"),
])
@pytest.mark.parametrize("command", ["--check-config", "start",
                                     "--db-stats"])
def test_a_login_the_server_refuses_is_a_configuration_error(
        tmp_path, postgresql, pg_uri, driver, case, cause, command):
    name = pg_uri.rsplit("/", 1)[1]
    uri = {"wrong password": postgresql.uri(name, password="Wr0ng?PW"),
           "no such database": postgresql.uri("nosuch"),
           "no such role": postgresql.uri(name, "nosuch", "Wr0ng?PW")}[case]
    args = start_args() if command == "start" else [command]
    result = run(tmp_path, uri, *args, driver=driver)
    code, out, err = result
    # The store commands fail as on any error of the store.
    assert code == (1 if command == "--db-stats" else 2), err
    assert cause in err
    assert "is not usable now" not in err       # no outage, no fallback
    text = written(tmp_path, result)
    assert "Wr0ng" not in text and "secret" not in text


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_a_server_nothing_listens_for_is_an_outage(tmp_path, driver):
    uri = "postgresql://greylist:Q9?x%%40Y@127.0.0.1:%d/greylist" % (
        free_port())
    result = run(tmp_path, uri, "--check-config", driver=driver)
    code, out, err = result
    assert code == 0, err
    assert "Connection refused" in err
    assert "is not usable now" in err
    assert "decisions fall back to greylist_fail_mode (defer)" in err
    assert "Q9?x" not in written(tmp_path, result)


@pytest.mark.parametrize("driver", PG_DRIVERS)
def test_a_password_in_a_passfile_others_cannot_read(tmp_path, postgresql,
                                                     driver):
    uri = postgresql.login(SPECIAL, SPECIAL_WRITTEN)
    role = uri.split("//")[1].split(":")[0]
    passfile = tmp_path / "pgpass"
    passfile.write_text("127.0.0.1:%d:%s:%s:%s\n"
                        % (postgresql.port, role, role, SPECIAL))
    uri = "postgresql://%s@127.0.0.1:%d/%s?passfile=%s" % (
        role, postgresql.port, role, passfile)
    passfile.chmod(0o600)
    code, out, err = run(tmp_path, uri, "--check-config", driver=driver)
    assert code == 0, err
    assert ": usable (%s)" % driver in out
    # libpq ignores a password file that others may read: no password,
    # which is no outage.
    passfile.chmod(0o644)
    code, out, err = run(tmp_path, uri, "--check-config", driver=driver)
    assert code == 2, err
    assert "no password supplied (the server asks for a password: name a " \
        "passfile" in err


def test_a_login_refused_while_serving_is_an_outage_logged_once(
        proxies, postgresql):
    uri = postgresql.login(SPECIAL, SPECIAL_WRITTEN)
    role = uri.split("//")[1].split(":")[0]
    # One process: each worker would log its own outage once.
    proxy = proxies(uri, "mx1", greylist_cache_time=0, workers=1)
    assert rcpt(proxy) == 451                       # greylisted
    # The password changes on the server; the session it had ends.
    postgresql.sql("ALTER ROLE %s PASSWORD 'other'; SELECT "
                   "pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                   "usename = '%s'" % (role, role))
    assert [rcpt(proxy, sender) for sender in SENDERS] == [451] * 5
    assert proxy.process.poll() is None             # an outage: it serves
    log = proxy.stderr_text()
    refused = [line for line in log.splitlines()
               if "password authentication failed" in line]
    assert len(refused) == 1, log                   # once, as an error
    assert "ERROR" in refused[0] and "SQLSTATE 28P01" in refused[0]
    assert "decisions fall back to defer" in refused[0]
    logs = log + read(os.path.join(os.path.dirname(proxy.config_path),
                                   "greylist.log"))
    for piece in SPECIAL_PIECES:
        assert piece not in logs


def test_without_a_driver_the_start_says_what_to_install(tmp_path, pg_uri):
    for args in (["--check-config"], ["--db-stats"],
                 ["--listen", "127.0.0.1:%d" % free_port(),
                  "--upstream", "127.0.0.1:9"]):
        code, out, err = run(tmp_path, pg_uri, *args, no_driver=True)
        assert code == 1, (args, err)
        assert "pip install 'smtpproxy[postgresql]'" in err, args
        assert "secret" not in err


def error_lines(text):
    return [line for line in text.splitlines()
            if line.startswith("smtpproxy: error: ")]


def check_and_start(tmp_path, uri, **options):
    """The error lines of --check-config and of a start on ``uri``, run
    as run() does with ``options``; both must have failed."""
    said = []
    for args in (["--check-config"],
                 ["--listen", "127.0.0.1:%d" % free_port(),
                  "--upstream", "127.0.0.1:9"]):
        code, out, err = run(tmp_path, uri, *args, **options)
        assert code == 1, (args, code, err)
        said.append(error_lines(err))
    return said


def test_a_driver_that_cannot_be_imported_is_told_from_one_not_installed(
        tmp_path, pg_uri):
    # Installed, but its library is missing (or its files unreadable):
    # --check-config and the start say so alike, and why, not "not
    # installed".
    for name in ("psycopg", "psycopg2"):
        package = tmp_path / "broken" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(
            "raise ImportError('libpq.so.5: cannot open shared object file:"
            " No such file or directory')\n")
    check, start = check_and_start(tmp_path, pg_uri, prelude=(
        "import sys; sys.path.insert(0, %r); " % str(tmp_path / "broken")))
    assert check == start and len(check) == 1, (check, start)
    err = check[0]
    assert ("its driver psycopg cannot be imported (libpq.so.5: cannot open "
            "shared object file: No such file or directory); psycopg2 cannot "
            "be imported (libpq.so.5: ") in err, err
    assert "install it again, or make its files readable by the serving " \
        "user" in err
    assert "not installed" not in err and "secret" not in err


DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.mark.parametrize("python", [sys.executable, DEBIAN_PYTHON])
def test_without_a_driver_check_config_and_the_start_say_what_to_install(
        tmp_path, pg_uri, python):
    # Both drivers named, once, without a double negative; pip's form for
    # a venv, and apt's for Debian's own python3, whose pip refuses to
    # install into it (PEP 668).  --check-config says what the start says.
    if python == DEBIAN_PYTHON:
        assert os.path.exists("/etc/debian_version") and os.path.exists(
            python), "Debian's python3, as CI has"
    check, start = check_and_start(tmp_path, pg_uri, python=python,
                                   no_driver=True)
    assert check == start and len(check) == 1, (check, start)
    err = check[0]
    assert err.startswith("smtpproxy: error: greylisting store "
                          "postgresql://greylist:***@"), err
    assert ("greylist_db is a PostgreSQL database, but neither psycopg nor "
            "psycopg2 is installed for %s: " % python) in err, err
    if python == DEBIAN_PYTHON:
        assert err.endswith(": apt install python3-psycopg (or "
                            "python3-psycopg2) (or, in a venv: pip install "
                            "'smtpproxy[postgresql]')"), err
    else:
        assert err.endswith(": pip install 'smtpproxy[postgresql]' (or pip "
                            "install 'psycopg[binary]')"), err
    assert "no PostgreSQL driver" not in err and "secret" not in err


def test_without_a_driver_debians_python_is_told_to_use_apt(monkeypatch):
    # Debian's own python3 refuses pip (PEP 668): its package is the way.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    monkeypatch.setattr(sys, "prefix", "/usr")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    with pytest.raises(smtpproxy.StoreError) as caught:
        smtpproxy.postgresql_driver()
    text = str(caught.value)
    if os.path.exists("/etc/debian_version"):
        assert text.endswith(
            "neither psycopg nor psycopg2 is installed for %s: apt install "
            "python3-psycopg (or python3-psycopg2) (or, in a venv: pip "
            "install 'smtpproxy[postgresql]')" % sys.executable), text
    else:
        assert "pip install 'smtpproxy[postgresql]'" in text, text
    with pytest.raises(smtpproxy.StoreError) as caught:
        smtpproxy.postgresql_driver("psycopg2")
    assert "but psycopg2 is not installed for %s: apt install python3-" \
        "psycopg2 (or," % sys.executable in str(caught.value) or \
        not os.path.exists("/etc/debian_version")


def test_the_module_needs_no_driver(tmp_path):
    code, out, err = run(tmp_path, str(tmp_path / "grey.db"),
                         "--check-config", "-q", no_driver=True)
    # (Its only warning: no real server answers at the default upstream.)
    assert code == 0 and not error_lines(err), err
    assert "psycopg" not in err and "PostgreSQL" not in err, err


def test_db_commands_on_postgresql(tmp_path, pg_uri):
    store = smtpproxy.PostgreSQLStore(pg_uri)
    store.decide("192.0.2.0/24 a@example.net b@example.org", 0)
    store.close()
    code, out, err = run(tmp_path, pg_uri, "--db-stats")
    assert (code, out.split()) == (0, ["CLIENT", "0", "GREY", "1",
                                       "WHITE", "0"]), err
    assert "store postgresql://greylist:***@" in err
    code, out, _ = run(tmp_path, pg_uri, "--db-pass", "192.0.2.7",
                       "c@example.net", "b@example.org")
    assert out == "passed 192.0.2.0/24 c@example.net b@example.org\n"
    code, out, _ = run(tmp_path, pg_uri, "--db-list")
    assert [line.split(" | ")[0] for line in out.splitlines()[1:]] == [
        "GREY    192.0.2.0/24 a@example.net b@example.org",
        "WHITE   192.0.2.0/24 c@example.net b@example.org"]
    code, out, _ = run(tmp_path, pg_uri, "--db-purge")
    assert (code, out) == (0, "purged 0\n")
    code, out, _ = run(tmp_path, pg_uri, "--db-delete",
                       "192.0.2.0/24 a@example.net b@example.org")
    assert (code, out) == (0, "deleted 192.0.2.0/24 a@example.net "
                              "b@example.org\n")
    code, out, _ = run(tmp_path, pg_uri, "--db-stats")
    assert out.split() == ["CLIENT", "0", "GREY", "0", "WHITE", "1"]
