"""Eddy: a realtime CQRS backend (the Starlette app, the CLI and the domain contexts)."""
