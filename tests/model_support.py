"""What the model-based rolling-deploy tests share: a database cloned per example, app connections per version
(search_path, every statement prepared), and the DBA's commands with their one rule: refused changes nothing."""

from __future__ import annotations

import secrets
from typing import Callable

import psycopg
from hypothesis.stateful import RuleBasedStateMachine
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.engine.errors import OrchestratorError, Refused
from orchestrator.engine.playbook import Playbook
from orchestrator.run.runner import Orchestrator


class ClonedDatabaseMachine(RuleBasedStateMachine):
    """One database per example, cloned from `template_dsn` on the server of `admin_dsn`."""

    template_dsn: str = ""
    admin_dsn: str = ""

    def clone(self, prefix: str) -> None:
        self.db = f"{prefix}_{secrets.token_hex(5)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(self.db), sql.Identifier(conninfo_to_dict(self.template_dsn)["dbname"])))
        self.dsn = make_conninfo(self.template_dsn, dbname=self.db)
        self.conns: dict[str, psycopg.Connection] = {}

    def teardown(self):
        for conn in getattr(self, "conns", {}).values():
            conn.close()
        if getattr(self, "db", None):
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.db)))

    def conn(self, version: str) -> psycopg.Connection:
        """The app version's connection: its schema of views first, every statement server-side prepared."""
        if version not in self.conns or self.conns[version].closed:
            self.conns[version] = psycopg.connect(self.dsn, autocommit=True, prepare_threshold=0,
                                                  options=f"-csearch_path={version},public")
        return self.conns[version]

    def dba(self, pb: Playbook, position: Callable[[Orchestrator], tuple], what: str, *args) -> bool:
        """Run an orchestrator command; False when refused, after checking the refusal changed nothing."""
        orch = Orchestrator(pb, self.dsn)
        before = position(orch)
        try:
            getattr(orch, what)(*args)
        except Refused:
            assert position(orch) == before, (what, args, before, position(orch))
            return False
        finally:
            orch.close()
        return True

    def rollback_stopped_part_way(self, pb: Playbook, table: str, phase: int) -> None:
        """An app transaction holds `table` past the command's lock budget: rollback `phase` gives up wherever
        it got to (the blocker goes after it)."""
        blocker = psycopg.connect(self.dsn)
        try:
            blocker.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
            orch = Orchestrator(pb, self.dsn)
            try:
                orch.rollback(phase)
            except OrchestratorError:
                pass
            finally:
                orch.close()
        finally:
            blocker.close()
