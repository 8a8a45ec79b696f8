"""The coordinator's SuperLink with its APIs split by listener: sites reach the Fleet API and nothing else.

Flower 1.42 serves the Fleet API (SuperNodes, ``/v1/fleet``), the Control API (``flwr run/ls/stop/log``,
``/v1/control``) and the Runtime API (SuperExec and ServerApp, ``/v1/runtime``) from one FastAPI app on one port,
and open-source Flower authenticates neither the Control API nor, in its default subprocess isolation, the
Runtime API. Anyone who could reach that port could submit, stop and list runs, or claim the coordinator's
ServerApp task with a SuperExec of their own.

``python -m fedrad.server.superlink --fleet-address HOST:PORT [flower-superlink arguments]`` runs Flower's own
``flower-superlink`` (same argument parsing, same app, same uvicorn server) with two listeners instead of one:

* the address Flower is given (``--host``/``--port``: ``fedrad coordinator start`` uses 127.0.0.1 and its
  ``--control-port``) serves every API, for the operator's ``flwr`` CLI, ``fedrad study run`` and the SuperExec
  on the coordinator host;
* ``--fleet-address`` (the sites' address, e.g. ``0.0.0.0:9300``) serves only ``/v1/fleet/...``; any other path
  gets 404 whoever asks, so a reverse proxy or a firewall rule in front of it cannot open more.

Both listeners use the same TLS certificate. With ``--isolation process`` and ``--superexec-auth-secret-file``
(what ``fedrad coordinator start`` passes), only a SuperExec holding the coordinator's secret can claim a run's
ServerApp even on the coordinator host. The one patch is the ``uvicorn.run`` call inside Flower's SuperLink
command, replaced by the same server on two sockets.
"""
from __future__ import annotations

import socket
import sys

#: paths the sites' listener serves (everything a SuperNode calls lives under it)
FLEET_PREFIX = "/v1/fleet/"


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as ``(host, port)``."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class FleetOnly:
    """ASGI wrapper: a connection accepted on ``fleet_port`` may call only the Fleet API (404 otherwise)."""

    def __init__(self, app, fleet_port: int):
        self.app = app
        self.fleet_port = int(fleet_port)

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and _local_port(scope) == self.fleet_port \
                and not str(scope.get("path", "")).startswith(FLEET_PREFIX):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b'{"detail":"Not Found"}'
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _local_port(scope) -> int | None:
    server = scope.get("server")
    return int(server[1]) if server and len(server) > 1 and server[1] is not None else None


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"fedrad: error: cannot listen on {host}:{port} ({exc.strerror}); is another SuperLink "
                         "running there? pass another --port") from None
    return sock


def _two_listener_run(fleet_host: str, fleet_port: int):
    import uvicorn

    def run(app, host, port, **kwargs):
        config = uvicorn.Config(FleetOnly(app, fleet_port), host=host, port=port, **kwargs)
        server = uvicorn.Server(config)
        sockets = [_listen(host, port), _listen(fleet_host, fleet_port)]
        print(f"fedrad: SuperLink APIs on {host}:{port} (coordinator host); Fleet API only on "
              f"{fleet_host}:{fleet_port} (sites)", file=sys.stderr, flush=True)
        server.run(sockets=sockets)

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--fleet-address" not in argv or argv.index("--fleet-address") + 1 >= len(argv):
        print("usage: python -m fedrad.server.superlink --fleet-address HOST:PORT [flower-superlink args]",
              file=sys.stderr)
        return 2
    i = argv.index("--fleet-address")
    fleet = argv[i + 1]
    del argv[i:i + 2]
    fleet_host, fleet_port = split_address(fleet)
    import importlib

    cli = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package re-exports the function
    cli.uvicorn.run = _two_listener_run(fleet_host, fleet_port)  # the module's own reference to uvicorn
    sys.argv = ["flower-superlink", *argv]
    cli.flower_superlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
