"""`gpuwarden auth`: the server's authorization and every principal's credentials.

One command makes a whole deployment's identities, so that nobody writes the permission
table by hand: `auth.conf` for nats-server and one `<principal>.creds` per principal
(engine, api, reader, operator, admin, `node-<N>` per `--node`, `user-<U>` per
`--user`). Run it again to add nodes or users: principals already there keep their
seeds, so nothing deployed stops working.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "auth",
        help="generate nats-server authorization and credentials for every principal",
        description="Write DIR/auth.conf (nkey users with least-privilege permissions, to "
        "include from nats-server's configuration) and DIR/<principal>.creds (secret, mode "
        "0600) for admin, engine, api, reader, operator, node-<N> per --node and user-<U> "
        "per --user, then print who may do what. Re-running keeps existing seeds and adds "
        "new principals; delete a .creds file and re-run to revoke that principal.",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="credentials directory"
    )
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME",
        help="a node agent's name (repeatable): principal node-<NAME>",
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="NAME",
        help="a task owner (repeatable): principal user-<NAME>, the task API as itself",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=run_auth)


async def run_auth(args: argparse.Namespace) -> int:
    from gpuwarden.adapters.auth import generate, print_summary

    issued = await anyio.to_thread.run_sync(generate, args.out, args.node, args.user)
    print_summary(issued, args.out, as_json=args.json)
    if not args.json:
        print(
            f'gpuwarden: include "{(args.out / "auth.conf").resolve()}" in nats-server\'s '
            "configuration; hand each .creds file to its principal only",
            file=sys.stderr,
        )
    return 0
