"""PostgreSQL read models, the framework: what a projection declares, the projector
and its checkpoints, migrations, the event archive, materialized views, the query
cache, zero-downtime rebuilds, schema drift and lag status.

It knows no application: the projections, views and contexts of a system are
built in its composition root (`app/registry.py`) and passed in.
"""
