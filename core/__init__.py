"""What every other package shares: the wire messages, the errors, the settings,
the catalog of a system's messages, and what "a dependency is down" means.

The bottom of the layering: `core` ← `streams` ← `projections` ← `app`. It
imports nothing of Eddy's own from above.
"""
