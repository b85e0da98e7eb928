"""A system: the read models, materialized views and process managers Eddy runs,
and what follows from them — its contexts (those its read models read, in order),
the catalog of their messages, and the event archive of every context.

Built once, in the composition root (`app/registry.py`), checked there (the
catalog's names and upcasters, every cached query's and view's account of the
events it reads: a `ConfigurationError` at start-up, never a stale answer later),
and handed to the processes (`app/runtime.py`, `app/web.py`), which hand its
parts down to the framework.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.catalog import Catalog
from core.errors import ConfigurationError
from core.messages import Context
from projections import archive
from projections.cache import Generations
from projections.db import Pool
from projections.projection import Projection, check_invalidations
from projections.projector import Hooks
from projections.views import Refresher, View, serving
from streams.process_managers import ProcessManager


@dataclass(frozen=True, eq=False)
class System:
    catalog: Catalog
    projections: tuple[Projection, ...]
    """The read models, each with the queries of the views it serves, then the archive."""
    views: tuple[View, ...]
    process_managers: tuple[ProcessManager, ...]

    @property
    def contexts(self) -> tuple[Context, ...]:
        """Its contexts: those its read models read, in order (the catalog's)."""
        return self.catalog.contexts

    @classmethod
    def of(
        cls,
        read_models: Sequence[Projection],
        views: Sequence[View] = (),
        process_managers: Sequence[ProcessManager] = (),
        *,
        contexts: Sequence[Context] = (),
    ) -> System:
        """The system of `read_models` (and of `contexts` no read model reads)."""
        found: dict[str, Context] = {}
        for context in [*contexts, *(c for p in read_models for c in p.reads)]:
            if found.setdefault(context.name, context) is not context:
                raise ConfigurationError(f"two contexts named {context.name!r}")
        every = tuple(found.values())
        projections = serving((*read_models, archive.projection(every)), views)
        _unique("projection", [p.name for p in projections])
        _unique("view", [v.name for v in views])
        _unique("process manager", [m.name for m in process_managers])
        for manager in process_managers:
            if unknown := set(manager.contexts) - set(found):
                raise ConfigurationError(f"{manager.name} reads unknown contexts {unknown}")
        check_invalidations(projections)
        return cls(Catalog(every), projections, tuple(views), tuple(process_managers))

    def projector_hooks(self, pool: Pool, view_debounce_s: float) -> tuple[Hooks, Refresher]:
        """What every batch of a projection does besides its rows: move the
        generations of the cached answers it changes and note the views it makes
        stale, in its transaction; after its COMMIT, wake the views' refresher."""
        refresher = Refresher(pool, self.views, debounce_s=view_debounce_s)
        hooks = Hooks(
            in_transaction=[Generations(self.projections).advance, refresher.record_changes],
            on_commit=[refresher.mark],
        )
        return hooks, refresher

    def projection(self, name: str) -> Projection:
        for projection in self.projections:
            if projection.name == name:
                return projection
        names = ", ".join(p.name for p in self.projections)
        raise ConfigurationError(f"no projection {name!r}; there are: {names}")


def _unique(what: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{what} names must be unique: {sorted(names)}")
