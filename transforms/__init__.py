"""Per-event transforms declared in config (filter, drop/rename, mask, route).

Empty for now: the first transforms arrive with their own issue.
"""
