"""Tiny models, local services and the demo.

Shipped because ``imageq demo --tiny`` uses them; nothing in the runtime imports them.
"""
