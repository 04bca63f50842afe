"""``lorablend view``'s flags and its run (``cli.py`` keeps only the registration): the sweep viewer on
127.0.0.1 by default; another address only with a token, as ``serve``.

>>> check_exposure("127.0.0.1", None)
>>> check_exposure("0.0.0.0", None)
Traceback (most recent call last):
...
ValueError: --host 0.0.0.0: the viewer listens beyond this machine only with a token; pass --token (or LORABLEND_TOKEN)
"""

from __future__ import annotations

import argparse
import ipaddress
import os

DESCRIPTION = ("Serve a page over a sweep folder (lorablend sweep -o OUT): the grid (prompt x seed x mix), filters "
               "by axis value, a cell's image and manifest line; refreshes while the sweep runs. Read-only.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The viewer's flags. >>> add_arguments(argparse.ArgumentParser())"""
    p.add_argument("folder", help="a sweep's output folder (it holds sweep.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    p.add_argument("--token", default=os.environ.get("LORABLEND_TOKEN"),
                   help="a token the page asks for (default: $LORABLEND_TOKEN); required beyond 127.0.0.1")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``view`` to the CLI's subcommands (``cli.py`` calls this). >>> see the module"""
    p = sub.add_parser("view", description=DESCRIPTION, help="a page over a sweep folder: grid, filters, cells")
    add_arguments(p)
    p.set_defaults(func=run)


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token. >>> see the module"""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not token:
        raise ValueError(f"--host {host}: the viewer listens beyond this machine only with a token; pass --token "
                         "(or LORABLEND_TOKEN)")


def run(args: argparse.Namespace) -> int:
    """Check, build the app, serve until Ctrl-C. >>> run(args)                          # doctest: +SKIP"""
    import uvicorn

    from .viewer import create_viewer_app

    check_exposure(args.host, args.token)
    app = create_viewer_app(args.folder, token=args.token)
    print(f"lorablend view: http://{args.host}:{args.port}/  ({args.folder})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


__all__ = ["DESCRIPTION", "add_arguments", "check_exposure", "register", "run"]
