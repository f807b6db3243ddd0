"""chat-svc: a TCP line chat server on gevent, built to be run, watched and scaled."""

__version__ = "0.1.0"
