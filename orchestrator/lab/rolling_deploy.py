"""A rolling deploy, as the rehearsal runs it: instances of the seed's "before" app (native Enum) and "after" app
(String(50)), on SQLAlchemy's asyncio engine over asyncpg and over psycopg 3 (server-side prepared statements
both), each through its version's schema of views (playbook `app_versions`). The old instances are replaced one
by one while the migration runs: one once the new version exists (after phase 4), one after the swap, the
last after phase 6. Every instance must see zero errors and read only its own vocabulary, and every row any of
them wrote must hold the value it last wrote (in the final column's vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.engine.playbook import Playbook
from orchestrator.kinds.phases import versions
from orchestrator.lab.appmodels import OLD_LABELS, TABLES, AppInstance, Driver, Version, as_new, vocabulary

# (driver, the stage after which it is replaced): one instance each side of the swap, the last at the end.
INSTANCES: tuple[tuple[Driver, int], ...] = (("asyncpg", 4), ("psycopg", 5), ("asyncpg", 6))
PAUSE_S = 0.02


@dataclass
class RollingDeploy:
    pb: Playbook
    dsn: str
    old: list[AppInstance] = field(default_factory=list)
    new: list[AppInstance] = field(default_factory=list)

    @property
    def everyone(self) -> list[AppInstance]:
        return self.old + self.new

    def start(self) -> RollingDeploy:
        path = versions.search_path(self.pb, "old").replace(" ", "")
        self.old = [AppInstance(self.dsn, "before", driver, search_path=path, prefix=f"RDOLD{i}", seed=i,
                                pause=PAUSE_S, duration=3600).start() for i, (driver, _) in enumerate(INSTANCES)]
        return self

    def stage(self, label: str) -> None:
        for a in self.everyone:
            a.stage = label

    def after_phase(self, n: int) -> list[str]:
        """Replace the old instances due after phase n; returns what was done, for the report."""
        done = []
        path = versions.search_path(self.pb, "new").replace(" ", "")
        for i, (driver, when) in enumerate(INSTANCES):
            if when == n and self.old[i].running:
                self.old[i].wait_ops(10, timeout=60)
                self.old[i].stop()
                inst = AppInstance(self.dsn, "after", driver, search_path=path, prefix=f"RDNEW{i}", seed=i,
                                   pause=PAUSE_S, duration=3600, vary_extras=True)
                inst.stage = self.old[i].stage
                self.new.append(inst.start())
                done.append(f"old {driver} instance RDOLD{i} replaced by new RDNEW{i}")
        return done

    def settle(self, n_ops: int = 10) -> None:
        for a in self.everyone:
            if a.running:
                a.wait_ops(n_ops, timeout=60)

    def stop(self) -> None:
        for a in self.everyone:
            a.stop()

    # -- what the rehearsal checks ---------------------------------------------------------------------------
    def problems(self, rows: dict[str, dict[str, str]]) -> list[str]:
        """Errors, reads outside a version's vocabulary, and writes not found; `rows` is table -> id -> value
        of the final column, for the ids the instances wrote."""
        out = []
        for a in self.everyone:
            if a.stats.errors or a.fatal is not None:
                out.append(f"{a.prefix} ({a.version}, {a.driver}): {len(a.stats.errors)} errors, e.g. "
                           f"{a.errors_text(3)}")
            foreign = {k: n for k, n in a.stats.reads.items() if _foreign(a.version, k[1])}
            if foreign:
                out.append(f"{a.prefix} ({a.version}) read values outside its vocabulary: {foreign}")
        for table in TABLES:
            wrote = {i: as_new(v) for a in self.everyone for i, v in a.stats.written[table].items()}
            lost = {i: (v, rows.get(table, {}).get(i)) for i, v in wrote.items() if rows.get(table, {}).get(i) != v}
            if lost:
                out.append(f"{table}: {len(lost)} app writes lost (wrote, found), e.g. {list(lost.items())[:3]}")
        return out

    def written_ids(self) -> dict[str, set[str]]:
        return {t: {i for a in self.everyone for i in a.stats.written[t]} for t in TABLES}

    def latency(self) -> dict[str, dict]:
        """Per version: operations, errors and latency (ms) as the instances saw it."""
        out = {}
        for version, apps in (("old", self.old), ("new", self.new)):
            lat = sorted(x for a in apps for x in a.stats.latencies_ms)

            def pick(p: float, lat: list[float] = lat) -> float:
                return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else 0.0
            out[version] = {"instances": [f"{a.prefix} ({a.driver})" for a in apps],
                            "ops": sum(a.stats.total for a in apps), "errors": sum(len(a.stats.errors) for a in apps),
                            "p50_ms": round(pick(50), 2), "p99_ms": round(pick(99), 2),
                            "max_ms": round(lat[-1], 2) if lat else 0.0}
        return out


def _foreign(version: Version, value) -> bool:
    """A read the version could not have meant: the old app sees only its labels; the new app sees any value
    but NULL and the old labels (values with no label, like medical_chat, are its own: the rehearsal's traffic
    writes them)."""
    if version == "before":
        return value not in vocabulary(version)
    return value is None or (value in OLD_LABELS and value not in vocabulary(version))
