"""imageq's producer side: the contract, the client, webhook verification, the CLI.

Light on purpose: a backend service installs only this (no torch). What a backend needs
is re-exported at the package's top (``from imageq import Client``: imageq/__init__.py).
"""
