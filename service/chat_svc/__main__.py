"""Entry point of ``chat-svc`` and ``python -m chat_svc``.

gevent must patch the standard library before anything else imports
``socket``, ``ssl`` or ``threading``, so the patch is the first statement.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["healthcheck"]:
        from .healthcheck import main as healthcheck

        sys.exit(healthcheck(argv[1:]))
    from .app import run

    sys.exit(run(argv))


if __name__ == "__main__":
    main()
