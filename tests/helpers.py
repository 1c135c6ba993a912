"""What the tests share with contrib/'s scripts, which import it from
the checkout (``sys.path.insert(0, "tests")``): nothing here needs
pytest, aiosmtpd or smtpproxy."""

import os
import socket


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()


def child_pids(pid):
    """The live (not zombie) processes whose parent is ``pid``, from /proc
    (Linux): a smtpproxy master's workers."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue                # gone meanwhile
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(name))
    return sorted(found)
