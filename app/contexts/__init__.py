"""The bounded contexts' domain code: one pure module per context (commands,
events, aggregate state, `decide`, `evolve`), importing nothing but `core`.

A context is part of the system once a read model reads it (`app/registry.py`).
"""
