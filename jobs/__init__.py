"""Maintenance jobs over the lake (compaction, merge into current-state tables, vacuum).

Empty for now: the jobs arrive with their own issue.
"""
