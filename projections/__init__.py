"""PostgreSQL read models: migrations, checkpoints, the projector and the queries."""
