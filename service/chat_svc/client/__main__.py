"""``python -m chat_svc.client``, the same as the ``chat-client`` console script."""

from chat_svc.client.cli import main

main()
