"""Development tooling, outside the application: embedded Valkey and PostgreSQL
servers (`embedded`) and the local folder `eddy dev` keeps its data, lock and JWT
secret in (`local`). Used by `eddy dev` and by the test suite on a machine with
no Redis or Postgres installed.
"""
