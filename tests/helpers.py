"""What the tests share with contrib/'s scripts, which import it from
the checkout (``sys.path.insert(0, "tests")``): nothing here needs
pytest, aiosmtpd or smtpproxy."""

import socket


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on (now)."""
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()
