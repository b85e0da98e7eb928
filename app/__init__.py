"""The application: the bounded contexts and their read models (the agent platform),
the composition root (`registry`, `runtime`, `cli`) and the Starlette app."""
