"""`watchdog-llm ssh-key` and `watchdog-llm hosts`: the controller's SSH key and its model hosts.

watchdog-llm ssh-key                     # make (once) and print the key, with the line to install it
watchdog-llm hosts                       # the catalog's hosts, and whether their host keys are accepted
watchdog-llm hosts check [NAME]          # connect and run `true` on each (or one)
watchdog-llm hosts accept NAME --fingerprint SHA256:...   # trust the key it offers, if it is that one
watchdog-llm hosts accept NAME --yes     # trust whatever it offers (you checked it some other way)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from watchdog_llm import config

if TYPE_CHECKING:
    from watchdog_llm.coordination.hosts import Host

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def add_parsers(sub: Any, command: Any) -> None:
    command(sub, "ssh-key", help="make (once) and print the controller's SSH key, with the line to install it")
    h = command(sub, "hosts", help="the model hosts of the catalog: list, check, accept their host keys")
    hs = h.add_subparsers(dest="hosts_command", metavar="ACTION")
    chk = command(hs, "check", help="connect to each host (or NAME) and run `true`")
    chk.add_argument("name", nargs="?", metavar="NAME")
    acc = command(
        hs,
        "accept",
        help="trust the host key NAME offers",
        description="Trust the host key NAME offers now. Check its fingerprint on the host first "
        "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and pass it with --fingerprint; --yes "
        "trusts whatever is offered.",
    )
    acc.add_argument("name", metavar="NAME")
    g = acc.add_mutually_exclusive_group()
    g.add_argument("--fingerprint", metavar="SHA256:...", help="accept only a key with this fingerprint")
    g.add_argument("--yes", action="store_true", help="accept the key offered, whatever it is")


def _err(msg: str) -> None:
    print(f"watchdog-llm: {msg}", file=sys.stderr)


def ssh_key(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.remote.ssh import ensure_key

    path, public, made = ensure_key(s.state_dir, f"watchdog-llm@{socket.gethostname()}")
    print(f"{'Made' if made else 'The'} controller's SSH key: {path} (public: {path}.pub)")
    print(public)
    print("\nOn each model host, as the user its catalog entry names, run:")
    print(f"  mkdir -p ~/.ssh && chmod 700 ~/.ssh && echo '{public}' >> ~/.ssh/authorized_keys", end="")
    print(" && chmod 600 ~/.ssh/authorized_keys")
    return EXIT_OK


def hosts(s: config.Settings, args: argparse.Namespace) -> int:
    from watchdog_llm.coordination.catalog import CatalogError
    from watchdog_llm.supervise.specs import load_catalog

    try:
        cat = load_catalog(s)
    except CatalogError as e:
        for line in str(e).splitlines():
            _err(line)
        return EXIT_CONFIG
    if not cat.hosts:
        _err(f"no hosts: add a `hosts:` section to the catalog file (MODELS={s.models or 'not set'})")
        return EXIT_CONFIG
    action = getattr(args, "hosts_command", None)
    if action == "accept":
        return _accept(s, cat.hosts, args)
    if action == "check":
        return asyncio.run(_check(s, cat.hosts, args.name))
    return _list(s, cat.hosts)


def _list(s: config.Settings, hosts: Mapping[str, Host]) -> int:
    from watchdog_llm.remote.ssh import fingerprint, known_keys

    for h in hosts.values():
        keys = known_keys(s.state_dir, h)
        state = (
            ", ".join(fingerprint(k) for k in keys) if keys else f"host key not accepted yet (hosts accept {h.name})"
        )
        print(f"{h.name:16} {h.user}@{h.address}:{h.port}  {state}")
    return EXIT_OK


async def _check(s: config.Settings, hosts: Mapping[str, Host], name: str | None) -> int:
    from watchdog_llm.remote.ssh import Remote, SshError

    if name is not None and name not in hosts:
        _err(f"no host {name!r} in the catalog (hosts: {', '.join(hosts)})")
        return EXIT_CONFIG
    remote = Remote(s.state_dir, logging.getLogger("watchdog_llm"))
    failed = 0
    for h in hosts.values() if name is None else [hosts[name]]:
        try:
            r = await remote.run(h, ["true"], timeout=15)
        except SshError as e:
            print(f"{h.name:16} FAILED  {e.message}")
            failed += 1
            continue
        print(f"{h.name:16} ok" if r.exit_status == 0 else f"{h.name:16} FAILED  `true` exited {r.exit_status}")
        failed += r.exit_status != 0
    return EXIT_FAIL if failed else EXIT_OK


def _accept(s: config.Settings, hosts: Mapping[str, Host], args: argparse.Namespace) -> int:
    from watchdog_llm.remote.ssh import SshError, accept, fingerprint, known_keys, offered_key

    h = hosts.get(args.name)
    if h is None:
        _err(f"no host {args.name!r} in the catalog (hosts: {', '.join(hosts)})")
        return EXIT_CONFIG
    try:
        key = asyncio.run(offered_key(h))
    except SshError as e:
        _err(e.message)
        return EXIT_FAIL
    offered = fingerprint(key)
    if any(fingerprint(k) == offered for k in known_keys(s.state_dir, h)):
        print(f"{h.shown}: {offered} is accepted already")
        return EXIT_OK
    if known_keys(s.state_dir, h):
        _err(f"{h.shown} offers {offered}, not the key accepted before: remove its old line first if that is expected")
        return EXIT_FAIL
    if not args.yes and args.fingerprint != offered:
        if args.fingerprint:
            _err(f"{h.shown} offers {offered}, not {args.fingerprint}: not accepted")
        else:
            print(f"{h.shown} offers {key.get_algorithm()} {offered}")
            print("Check it on the host (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then run:")
            print(f"  watchdog-llm hosts accept {h.name} --fingerprint {offered}")
        return EXIT_FAIL
    accept(s.state_dir, h, key)
    print(f"{h.shown}: accepted {offered}")
    return EXIT_OK
