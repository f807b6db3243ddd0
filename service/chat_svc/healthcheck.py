"""``chat-svc healthcheck``: the container's own probe, so the image needs no curl."""

from __future__ import annotations

import argparse
import http.client
import os
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="chat-svc healthcheck", description="Exit 0 when the probe answers 200.")
    parser.add_argument("--host", default="127.0.0.1")
    # With CHAT_METRICS_PORT the probes live there and the chat port answers them 404.
    port = os.environ.get("CHAT_METRICS_PORT") or os.environ.get("CHAT_PORT") or 9009
    parser.add_argument("--port", type=int, default=int(port), help="default: $CHAT_METRICS_PORT, else $CHAT_PORT")
    parser.add_argument("--path", default="/healthz", choices=("/healthz", "/readyz"))
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    connection = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
    try:
        connection.request("GET", args.path)
        response = connection.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as exc:
        print(f"unhealthy: {exc}")
        return 1
    finally:
        connection.close()
    print(f"{response.status} {body}")
    return 0 if response.status == 200 else 1
