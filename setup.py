"""Installs smtpproxy: one module, and the `smtpproxy` command.

smtpproxy has no runtime dependency outside the standard library; copying
smtpproxy.py onto a host works as well as installing it.  The one option:
a greylisting store in PostgreSQL, shared by several MX hosts, needs a
driver, `pip install .[postgresql]` (psycopg 3; psycopg2 on Python 3.6).  `pip install .`
also puts the example configuration, the sender pools' whitelist_clients,
the init script, its defaults file and the systemd unit under
PREFIX/share/smtpproxy/.  pyproject.toml names the build (setuptools, PEP
517): pip builds a wheel, with no legacy `setup.py install`.
"""

import re

from setuptools import setup

with open("smtpproxy.py") as source:
    VERSION = re.search(r'^__version__ = "([^"]+)"', source.read(),
                        re.M).group(1)

setup(
    name="smtpproxy",
    version=VERSION,
    description="A strict greylisting SMTP proxy that passes on the real "
                "server's verdict",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    py_modules=["smtpproxy"],
    python_requires=">=3.6",
    entry_points={"console_scripts": ["smtpproxy = smtpproxy:main"]},
    extras_require={
        "postgresql": ['psycopg[binary]; python_version >= "3.7"',
                       'psycopg2-binary; python_version < "3.7"'],
    },
    # Under the installation prefix (/usr/local with pip as root): to be
    # copied to /etc by the administrator, never overwritten by pip.
    data_files=[
        ("share/smtpproxy", ["contrib/greylist.conf.dist",
                             "contrib/whitelist_clients"]),
        ("share/smtpproxy/init.d", ["contrib/init.d/smtpproxy"]),
        ("share/smtpproxy/default", ["contrib/default/smtpproxy"]),
        ("share/smtpproxy/systemd", ["contrib/systemd/smtpproxy.service"]),
    ],
    classifiers=[
        "Environment :: No Input/Output (Daemon)",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.6",
        "Programming Language :: Python :: 3.13",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
