"""hash_keys: the store's triplet keys hold keyed hashes (HMAC-SHA256 with
the site's secret) of the sender and the recipient, never the addresses.
A real proxy on sqlite and on PostgreSQL (its policy service too)
greylists as before while no address reaches the store's bytes; hosts
sharing the secret make the same keys; the admin commands take addresses;
--db-hash-keys converts a clear store keeping its passes; the secret file
is refused where others could read or swap it.  The timings are set here:
the first try is deferred, a retry passes at once."""

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import smtpproxy
from conftest import HERE, ROOT, ProxyProcess, RawClient, free_port, \
    wait_until

SENDER = "alice.sender@example.net"
RECIPIENT = "bob.rcpt@example.org"
# What must never be in the store: the addresses, their local parts, the
# sender's domain (the store has no other reason to hold it).
CLEAR = [SENDER, RECIPIENT, "alice.sender", "bob.rcpt", "example.net",
         "example.org"]

TIMINGS = {"too_soon": 0, "min_defer_time": 0, "max_defer_time": 3600,
           "max_grey": 86400, "auto_whitelist_clients": 0}


def make_secret(path, text=None, mode=0o600):
    """A secret file at ``path``: 32 random octets in base64, as the
    README makes one, or ``text``."""
    if text is None:
        text = smtpproxy.base64.b64encode(os.urandom(32)).decode() + "\n"
    with open(str(path), "w") as secret:
        secret.write(text)
    os.chmod(str(path), mode)
    return str(path)


def config(store, secret, **keys):
    values = dict(TIMINGS, greylist_db=store, hash_keys=secret,
                  client_key="network", workers=1)
    values.update(keys)
    return ("allowed_senders:\nallowed_domains:\n    example.org\n"
            + "".join("%s = %s\n" % item for item in values.items()))


def settings(store, secret, **keys):
    values = dict(TIMINGS, greylist_db=store, hash_keys=secret,
                  client_key="network", allowed_domains=["example.org"])
    values.update(keys)
    return type("Settings", (smtpproxy.GreyListingPolicy,), values)


def store_bytes(path):
    """The raw bytes of the sqlite store and of its -wal and -shm."""
    data = b""
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            with open(name, "rb") as stored:
                data += stored.read()
    return data


def assert_no_address(data):
    if isinstance(data, bytes):
        data = data.decode("latin-1")
    for text in CLEAR:
        assert text not in data.lower(), text


def send(port, sender=SENDER, recipient=RECIPIENT, data=True):
    """One session: the RCPT's reply code; the message sent if accepted."""
    client = RawClient(port)
    client.cmd("EHLO client.example.net")
    client.cmd("MAIL FROM:<%s>" % sender)
    code = client.cmd("RCPT TO:<%s>" % recipient)[0]
    if code == 250 and data:
        assert client.cmd("DATA")[0] == 354
        assert client.cmd("Subject: hi\r\n\r\nhello\r\n.")[0] == 250
    client.cmd("QUIT")
    client.close()
    return code


def run(tmp_path, *args):
    """smtpproxy.py with the configuration tmp_path/admin.conf."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    process = subprocess.run(
        [sys.executable, os.path.join(ROOT, "smtpproxy.py"),
         "--config", str(tmp_path / "admin.conf")] + list(args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=str(tmp_path))
    return (process.returncode, process.stdout.decode(),
            process.stderr.decode())


def ask_policy(port, sender=SENDER, recipient=RECIPIENT):
    """One request to the policy service, as Postfix's smtpd asks."""
    request = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
               "protocol_name": "ESMTP", "client_address": "127.0.0.1",
               "client_name": "unknown", "helo_name": "client.example.net",
               "sender": sender, "recipient": recipient}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(("%s=%s\n" % item).encode()
                              for item in request.items()) + b"\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            data = sock.recv(4096)
            assert data, answer
            answer += data
    return answer.decode().split("=", 1)[1].strip()


# -- the proxy greylists as before, and the store holds no address -----------

def test_a_proxy_on_sqlite_greylists_with_no_address_in_the_store(
        tmp_path, upstream):
    store = str(tmp_path / "greylist.db")
    secret = make_secret(tmp_path / "secret")
    proxy = ProxyProcess(tmp_path, upstream.port, handler=None,
                         config=config(store, secret,
                                       x_greylist_header="yes"))
    upstream.forget_probe(proxy.probes)
    try:
        assert send(proxy.port) == 451           # greylisted
        assert send(proxy.port) == 250           # and passed, as before
        assert send(proxy.port) == 250           # passed: at once
        # While it runs: the file, its WAL and shared memory.
        wait_until(lambda: b"hmac:" in store_bytes(store),
                   what="the triplet in the store")
        assert_no_address(store_bytes(store))
    finally:
        proxy.stop()
    assert_no_address(store_bytes(store))
    [first, second] = upstream.messages
    # The header says how long and by which rule; the log keeps the
    # addresses (it is the admin's log, not the store).
    assert re.search(br"X-Greylist: delayed [0-9]+ seconds by smtpproxy-\S+ "
                     br"at \S+ \(network:127\.0\.0\.0/24\)", first.content)
    assert b"hmac:" not in first.content
    with open(str(tmp_path / "greylist.log")) as log:
        assert "<%s> | <%s> | ACCEPTED" % (SENDER, RECIPIENT) in log.read()
    code, out, _ = run_list(tmp_path, store)
    assert code == 0
    [line] = [line for line in out.splitlines() if "hmac:" in line]
    assert line.startswith("WHITE   127.0.0.0/24 hmac:")
    assert_no_address(out)


def run_list(tmp_path, store):
    (tmp_path / "admin.conf").write_text("greylist_db = %s\n" % store)
    return run(tmp_path, "--db-list")


def test_a_proxy_and_its_policy_service_on_postgresql_share_hashed_keys(
        tmp_path, upstream, pg_uri, postgresql):
    secret = make_secret(tmp_path / "secret")
    policy = free_port()
    proxy = ProxyProcess(tmp_path, upstream.port, handler=None, config=config(
        pg_uri, secret, greylist_fail_mode="defer",
        policy_listen="127.0.0.1:%d" % policy))
    upstream.forget_probe(proxy.probes)
    database = pg_uri.rsplit("/", 1)[1]
    try:
        # Deferred by the policy service, passed by the proxy: one key.
        assert ask_policy(policy).startswith("DEFER_IF_PERMIT")
        assert send(proxy.port) == 250
        assert ask_policy(policy) == "DUNNO"
        # A triplet the proxy saw first, passed by the policy service.
        other = "carol.other@example.net"
        assert send(proxy.port, sender=other) == 451
        assert ask_policy(policy, sender=other) == "DUNNO"
        dump = postgresql.sql("SELECT * FROM smtpproxy_triplets; "
                              "SELECT * FROM smtpproxy_clients", database)
    finally:
        proxy.stop()
    assert dump.count("hmac:") == 4             # two triplets, two parts
    assert_no_address(dump)
    assert "carol" not in dump
    # Nothing left anywhere in the database's tables, also after a dump.
    tables = subprocess.run(
        [os.path.join(postgresql.bindir, "pg_dump"), "-h",
         postgresql.socket_dir, "-p", str(postgresql.port), "-U",
         "postgres", "--data-only", database], stdout=subprocess.PIPE,
        check=True).stdout
    assert b"hmac:" in tables
    assert_no_address(tables)


# -- the same secret, the same keys ------------------------------------------

def test_hosts_with_the_same_secret_make_the_same_keys(tmp_path):
    text = smtpproxy.base64.b64encode(os.urandom(32)).decode()
    one = make_secret(tmp_path / "mx1.secret", text + "\n")
    two = make_secret(tmp_path / "mx2.secret", text)      # no newline
    other = make_secret(tmp_path / "other.secret")
    keys = []
    for name, secret in (("mx1", one), ("mx2", two), ("other", other)):
        engine = smtpproxy.Greylister(settings(
            str(tmp_path / (name + ".db")), secret))
        decision = engine.decide("192.0.2.7", "Alice+tag@Example.NET",
                                 "Bob@example.org", 1000.0)
        assert decision.verdict == "defer" and decision.added
        [entry] = smtpproxy.stores.get(engine.settings).entries()
        keys.append(entry[1])
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]
    client, sender, recipient = keys[0].split(" ")
    assert client == "192.0.2.0/24"             # the client stays
    assert smtpproxy.is_key_hash(sender) and smtpproxy.is_key_hash(recipient)
    # The parts are key_hash() of the normalised sender and recipient key.
    secret = text.encode()
    assert sender == smtpproxy.key_hash(secret, "alice@example.net")
    assert recipient == smtpproxy.key_hash(secret, "bob@example.org")
    assert len(sender) == len("hmac:") + 26                   # 128 bits


# -- the admin commands ------------------------------------------------------

def test_db_pass_and_db_delete_take_addresses_and_act_on_the_hashed_key(
        tmp_path):
    store = str(tmp_path / "admin.db")
    secret = make_secret(tmp_path / "secret")
    (tmp_path / "admin.conf").write_text(config(store, secret))
    code, out, err = run(tmp_path, "--db-pass", "192.0.2.7",
                         "Alice+tag@Example.net", "<bob@example.org>")
    assert code == 0, err
    assert_no_address(out)
    assert_no_address(store_bytes(store))
    engine = smtpproxy.Greylister(settings(store, secret))
    decision = engine.decide("192.0.2.9", "alice@example.net",
                             "bob@example.org", time.time())
    assert (decision.verdict, decision.added) == ("accept", False)
    code, out, _ = run(tmp_path, "--db-list")
    [line] = [line for line in out.splitlines() if line.startswith("WHITE")]
    assert line.split(" | ")[0].split()[1:] == decision.key.split()
    smtpproxy.reset_registries()        # what the engine knew, forgotten
    code, out, err = run(tmp_path, "--db-delete", "192.0.2.7",
                         "alice@example.net", "bob@example.org")
    assert code == 0, err
    decision = engine.decide("192.0.2.9", "alice@example.net",
                             "bob@example.org", time.time())
    assert (decision.verdict, decision.added) == ("defer", True)
    # The hashed key as --db-list shows it is taken too.
    code, out, err = run(tmp_path, "--db-pass", decision.key)
    assert code == 0, err
    code, out, _ = run(tmp_path, "--db-list")
    assert "WHITE   " + decision.key + " |" in out


def clear_store(store):
    """A store of clear keys, as smtpproxy made them without hash_keys: a
    passed triplet (passed twice), a grey one first seen 100 s ago, a
    client."""
    now = time.time()
    engine = smtpproxy.Greylister(settings(store, "", auto_whitelist_clients=5))
    for moment in (now - 500, now - 400, now - 300):
        engine.decide("192.0.2.7", SENDER, RECIPIENT, moment)
    engine.decide("192.0.2.7", "carol@example.net", RECIPIENT, now - 100)
    entries = list(smtpproxy.stores.get(engine.settings).entries())
    assert [entry[0] for entry in entries] == ["WHITE", "GREY", "CLIENT"]
    assert SENDER in entries[0][1] and entries[0][4] == 2
    smtpproxy.reset_registries()
    return entries


def entries(store):
    opened = smtpproxy.GreylistStore(store)
    try:
        return list(opened.entries())
    finally:
        opened.close()


def test_db_hash_keys_converts_a_clear_store_keeping_its_passes(tmp_path):
    store = str(tmp_path / "admin.db")
    before = clear_store(store)
    secret = make_secret(tmp_path / "secret")
    (tmp_path / "admin.conf").write_text(config(store, secret,
                                                min_defer_time=60))
    # As a running proxy would, another process has the store open.
    running = smtpproxy.GreylistStore(store)
    try:
        assert running.stats()["WHITE"] == 1
        code, out, err = run(tmp_path, "--db-hash-keys")
        assert (code, out) == (0, "hashed 2\n"), err
        assert_no_address(store_bytes(store))       # nothing left behind
        assert running.stats()["WHITE"] == 1
    finally:
        running.close()
    with open(secret, "rb") as text:
        key = text.read().strip()
    # The same entries (states, times, passes) under hashed keys; the
    # client is left as it was.
    assert sorted(entries(store)) == sorted(
        (state, smtpproxy.hash_store_key(name, key)) + tuple(rest)
        for state, name, *rest in before)
    assert ("CLIENT", "192.0.2.0/24") in [entry[:2]
                                          for entry in entries(store)]
    # The wait of the pass, which --db-report reads, is kept too.
    with smtpproxy.sqlite3.connect(store) as connection:
        assert connection.execute(
            "SELECT delay FROM triplets WHERE passed IS NOT NULL"
        ).fetchall() == [(100.0,)]
    # The passed triplet stays passed, the grey one keeps its first try.
    engine = smtpproxy.Greylister(settings(store, secret,
                                           min_defer_time=60))
    now = time.time()
    passed = engine.decide("192.0.2.7", SENDER, RECIPIENT, now)
    assert (passed.verdict, passed.delay) == ("accept", None)
    waited = engine.decide("192.0.2.7", "carol@example.net", RECIPIENT, now)
    assert waited.verdict == "accept" and waited.delay >= 100
    # Run again: nothing more to do.
    smtpproxy.reset_registries()
    assert run(tmp_path, "--db-hash-keys")[:2] == (0, "hashed 0\n")


def test_db_hash_keys_merges_a_key_the_proxy_hashed_meanwhile(tmp_path):
    store = str(tmp_path / "admin.db")
    clear_store(store)
    secret = make_secret(tmp_path / "secret")
    engine = smtpproxy.Greylister(settings(store, secret))
    # Turned on before the conversion: the passed triplet looks new.
    assert engine.decide("192.0.2.7", SENDER, RECIPIENT,
                         time.time()).added
    smtpproxy.reset_registries()
    (tmp_path / "admin.conf").write_text(config(store, secret))
    assert run(tmp_path, "--db-hash-keys")[:2] == (0, "hashed 2\n")
    white = [entry for entry in entries(store) if entry[0] == "WHITE"]
    assert len(white) == 1 and white[0][4] == 2      # its passes kept


def test_db_hash_keys_on_postgresql(tmp_path, pg_uri, postgresql):
    clear = smtpproxy.PostgreSQLStore(pg_uri, settings(pg_uri, ""))
    clear.database_clock = False
    now = time.time()
    for moment in (now - 500, now - 400):
        clear.decide("192.0.2.0/24 %s %s" % (SENDER, RECIPIENT), moment)
    clear.decide("192.0.2.0/24 carol@example.net %s" % RECIPIENT, now - 100)
    clear.close()
    secret = make_secret(tmp_path / "secret")
    (tmp_path / "admin.conf").write_text(config(pg_uri, secret))
    code, out, err = run(tmp_path, "--db-hash-keys")
    assert (code, out) == (0, "hashed 2\n"), err
    dump = postgresql.sql("SELECT key, passes, passed IS NOT NULL, delay"
                          " FROM smtpproxy_triplets ORDER BY passes",
                          pg_uri.rsplit("/", 1)[1])
    assert_no_address(dump)
    # The passes, and the wait of the pass (--db-report), are kept.
    assert [line.split("|")[1:] for line in dump.splitlines()] == [
        ["0", "f", ""], ["1", "t", "100"]]
    engine = smtpproxy.Greylister(settings(pg_uri, secret))
    assert engine.decide("192.0.2.7", SENDER, RECIPIENT,
                         time.time()).verdict == "accept"
    assert run(tmp_path, "--db-hash-keys")[:2] == (0, "hashed 0\n")


def test_db_hash_keys_needs_hash_keys(tmp_path):
    (tmp_path / "admin.conf").write_text("greylist_db = %s\n"
                                         % (tmp_path / "admin.db"))
    code, _, err = run(tmp_path, "--db-hash-keys")
    assert code == 2 and "hash_keys is not set" in err


# -- the secret file ---------------------------------------------------------

def bad_secrets(tmp_path):
    """(name, path, what the refusal says) of secret files to refuse."""
    readable = make_secret(tmp_path / "readable", mode=0o644)
    empty = make_secret(tmp_path / "empty", "\n")
    short = make_secret(tmp_path / "short", "s3cret\n")
    target = make_secret(tmp_path / "target")
    link = str(tmp_path / "link")
    os.symlink(target, link)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o777)
    in_shared = make_secret(shared / "secret")
    return [("readable", readable, "can be read or changed by other users"),
            ("empty", empty, "is empty"),
            ("short", short, "holds 6 octets"),
            ("link", link, "is a symbolic link"),
            ("shared", in_shared, "can be changed by another user"),
            ("missing", str(tmp_path / "missing"), "no such file")]


def test_check_config_refuses_a_secret_others_could_read_or_swap(tmp_path):
    store = str(tmp_path / "admin.db")
    for name, path, reason in bad_secrets(tmp_path):
        (tmp_path / "admin.conf").write_text(
            config(store, path) + "run_as_root = yes\n")
        code, _, err = run(tmp_path, "--check-config", "-q")
        assert code == 2 and reason in err, (name, err)
        assert "head -c 32 /dev/urandom | base64" in err or name in (
            "readable", "link", "shared"), (name, err)
    (tmp_path / "admin.conf").write_text(
        config(store, make_secret(tmp_path / "good")) + "run_as_root = yes\n")
    code, out, err = run(tmp_path, "--check-config")
    assert code == 0, err
    assert "hash_keys = %s" % (tmp_path / "good") in out.splitlines()


def test_the_start_refuses_a_secret_others_could_read_or_swap(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT]))
    for name, path, reason in bad_secrets(tmp_path):
        (tmp_path / "admin.conf").write_text(
            config(str(tmp_path / "admin.db"), path) + "run_as_root = yes\n")
        process = subprocess.run(
            [sys.executable, os.path.join(ROOT, "smtpproxy.py"), "--config",
             str(tmp_path / "admin.conf"), "--listen",
             "127.0.0.1:%d" % free_port()], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=str(tmp_path), timeout=30)
        assert process.returncode == 2, (name, process.stderr)
        assert reason in process.stderr.decode(), name


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the secret as root")
def test_a_secret_only_root_may_read_is_read_before_the_privilege_drop(
        tmp_path, upstream):
    # Where nobody may read the configuration (for the reload) and
    # write the store, but not read the secret.
    directory = tempfile.mkdtemp()
    os.chmod(directory, 0o755)
    store_dir = os.path.join(directory, "store")
    os.mkdir(store_dir)
    os.chown(store_dir, 65534, 65534)               # nobody's
    secret = make_secret(os.path.join(directory, "secret"))  # root's, 0600
    try:
        proxy = ProxyProcess(pathlib.Path(directory), upstream.port,
                             handler=None, config=config(
                                 os.path.join(store_dir, "greylist.db"),
                                 secret, user="nobody"))
    except BaseException:
        shutil.rmtree(directory)
        raise
    upstream.forget_probe(proxy.probes)
    try:
        assert send(proxy.port) == 451
        assert send(proxy.port) == 250
        # A reload, as nobody, cannot read it: the secret stays.
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded the configuration" in
                   proxy.stderr_text(), what="the reload")
        assert "the secret read at the start stays in force" in \
            proxy.stderr_text()
        assert send(proxy.port) == 250
        assert_no_address(store_bytes(os.path.join(store_dir,
                                                   "greylist.db")))
    finally:
        proxy.stop()
        shutil.rmtree(directory)


def test_a_reload_reads_a_new_secret_and_says_the_passes_are_lost(
        tmp_path, upstream):
    store = str(tmp_path / "greylist.db")
    secret = make_secret(tmp_path / "secret")
    proxy = ProxyProcess(tmp_path, upstream.port, handler=None,
                         config=config(store, secret, greylist_cache_time=0))
    upstream.forget_probe(proxy.probes)
    try:
        assert send(proxy.port, data=False) == 451
        assert send(proxy.port, data=False) == 250
        make_secret(secret)                          # a new one
        proxy.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded the configuration" in
                   proxy.stderr_text(), what="the reload")
        assert "hash_keys holds a new secret" in proxy.stderr_text()
        assert "every pass so far is lost" in proxy.stderr_text()
        assert send(proxy.port, data=False) == 451   # a new key
    finally:
        proxy.stop()


# -- greytraps hold no address either ------------------------------------------

TRAP = "trap.harvested@example.org"


def test_a_greytrap_sprung_with_hash_keys_leaves_no_address_in_the_store(
        tmp_path):
    store = str(tmp_path / "greylist.db")
    secret = make_secret(tmp_path / "secret")
    traps = tmp_path / "traps"
    traps.write_text(TRAP + "\n")
    engine = smtpproxy.Greylister(settings(
        store, secret, greytrap_recipients=str(traps)))
    decision = engine.decide("192.0.2.7", SENDER, TRAP, time.time())
    assert decision.rule.startswith("greytrap:hit")
    [trap] = smtpproxy.stores.get(engine.settings).traps()
    assert trap[0] == "192.0.2.0/24"
    assert trap[3] == engine.hashed(TRAP) and smtpproxy.is_key_hash(trap[3])
    smtpproxy.reset_registries()
    assert_no_address(store_bytes(store))
    assert "trap.harvested" not in store_bytes(store).decode("latin-1")


def test_db_hash_keys_hashes_the_recipients_of_greytraps(tmp_path):
    store = str(tmp_path / "admin.db")
    traps = tmp_path / "traps"
    traps.write_text(TRAP + "\n")
    clear = smtpproxy.Greylister(settings(store, "",
                                          greytrap_recipients=str(traps)))
    clear.decide("192.0.2.7", SENDER, TRAP, time.time())
    assert smtpproxy.stores.get(clear.settings).traps()[0][3] == TRAP
    smtpproxy.reset_registries()
    secret = make_secret(tmp_path / "secret")
    (tmp_path / "admin.conf").write_text(config(store, secret))
    assert run(tmp_path, "--db-hash-keys")[0] == 0
    assert "trap.harvested" not in store_bytes(store).decode("latin-1")
    code, out, _ = run(tmp_path, "--db-list")
    [line] = [line for line in out.splitlines()
              if line.startswith("TRAPPED")]
    assert "192.0.2.0/24" in line and "<hmac:" in line
