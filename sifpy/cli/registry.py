"""``sifpy registry login|logout``: credentials for a registry, stored 0600 in ~/.sifpy."""

from __future__ import annotations

import getpass
import sys

from sifpy.cli._args import ArgumentParser, add_registry_options
from sifpy.errors import UsageError
from sifpy.util import log


def build_parser(prog: str) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description="Log in to or out of an OCI registry.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    login = sub.add_parser("login", help="store credentials for a registry (checked first)")
    login.add_argument("-u", "--username", help="user name (prompted for if missing)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add_registry_options(login)
    login.add_argument("--no-check", action="store_true", help="store without checking")
    login.add_argument("registry", help="registry host[:port] (docker.io for Docker Hub)")
    logout = sub.add_parser("logout", help="forget a registry's credentials")
    logout.add_argument("registry")
    return p


def _registry(text: str) -> str:
    from sifpy.oci.auth import normalize_host

    host = normalize_host(text.removeprefix("docker://"))
    if not host or any(c in host for c in " /@"):
        raise UsageError(f"invalid registry: {text!r}")
    return host


def main(argv: list[str], prog: str = "sifpy registry") -> int:
    """Run ``sifpy registry``."""
    a = build_parser(prog).parse_args(argv)
    from sifpy.oci.auth import Credentials, remove_credentials, store_credentials

    host = _registry(a.registry)
    if a.action == "logout":
        if not remove_credentials(host):
            raise UsageError(f"can't log out: not logged in to {host}")
        log.info(f"removed credentials for {host}")
        return 0
    username = a.username
    if not username:
        if not sys.stdin.isatty():
            raise UsageError("can't log in: no --username given and stdin is not a terminal")
        username = input("Username: ").strip()
    if a.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise UsageError("can't log in: use --password-stdin when stdin is not a terminal")
    if not username or not password:
        raise UsageError("can't log in: empty username or password")
    if not a.no_check:
        from sifpy.oci.registry import RegistryClient
        from sifpy.oci.session import ClientOptions

        options = ClientOptions(insecure=a.insecure, ca_cert=a.ca_cert)
        with RegistryClient(host, options, Credentials(username, password, "login")) as c:
            c.check_login()
    path = store_credentials(host, username, password)
    log.info(f"logged in to {host} (credentials in {path})")
    return 0
