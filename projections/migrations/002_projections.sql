-- The projections installed in this schema, at the version their tables were
-- built for (a projection declaring another version is rebuilt).
CREATE TABLE eddy_projections (
    name text PRIMARY KEY,
    version integer NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    rebuilt_at timestamptz
);
