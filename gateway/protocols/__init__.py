"""Dialects the gateway speaks besides Chat Completions, each translated to and from chat.

Pure code: bodies and stream events in, bodies and bytes out. Modules here import nothing else
from the gateway, so they can be tested without Flask or sockets.
"""
