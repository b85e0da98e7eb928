"""The read models of the agent platform's contexts: one module per context (its
projection, its queries, the materialized views over its tables) and its tables
in `tables/<name>.sql`. Listed in `app/registry.py`.
"""
