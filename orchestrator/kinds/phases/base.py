"""What every phase is: expand, contract and rollback side by side, over a shared context."""

from __future__ import annotations

from typing import ClassVar

from orchestrator.engine.context import Context


class Phase:
    """One step of the migration. Subclasses fill in the three directions and their one-line docs."""

    name: ClassVar[str]
    title: ClassVar[str]
    expand_doc: ClassVar[str]
    contract_doc: ClassVar[str] = "nothing to remove"
    # Undoing the contract step (a rollback after the contract): put back, online, what the contract removed.
    uncontract_doc: ClassVar[str] = "nothing to put back"
    # What `status` says while this undo is done and earlier phases are still contracted, if their row misleads.
    undone_note: ClassVar[str] = ""
    rollback_doc: ClassVar[str]
    locks_doc: ClassVar[str]
    visible_to_app: ClassVar[bool] = False  # its rollback changes what the app sees: ask before doing it
    number: int  # its position in its kind, from 1: set on each instance by kinds.phases_for

    def described(self, settings) -> tuple[str, str]:
        """(title, expand_doc) as `plan` prints them for these settings (a phase whose method depends on them)."""
        return self.title, self.expand_doc

    def expand(self, ctx: Context) -> dict | None:
        raise NotImplementedError

    def rollback(self, ctx: Context) -> None:
        raise NotImplementedError

    def contract(self, ctx: Context) -> None:
        ctx.x.note(f"-- phase {self.name}: {self.contract_doc}")

    def uncontract(self, ctx: Context) -> None:
        ctx.x.note(f"-- phase {self.name}: undo the contract step: {self.uncontract_doc}")

    def check(self, ctx: Context) -> list[str]:
        """Problems left after expand (empty when the phase is really in place)."""
        return []

    def before_expand(self, ctx: Context) -> None:
        """Raise Refused when a precondition the state table cannot see does not hold."""

    # A phase spans every column of the playbook. By default each column is handled on its own, in playbook
    # order (rollbacks in reverse order); a phase that must treat them together (the swap) overrides these.
    def expand_all(self, ctxs: list[Context]) -> dict | None:
        details = {c.m.label: self.expand(c) for c in ctxs}
        details = {k: v for k, v in details.items() if v}
        return {"tables": details} if details else None

    def rollback_all(self, ctxs: list[Context]) -> None:
        for c in reversed(ctxs):
            self.rollback(c)

    def contract_all(self, ctxs: list[Context]) -> None:
        for c in ctxs:
            self.contract(c)

    def uncontract_all(self, ctxs: list[Context]) -> dict | None:  # the swap's returns the restore's details
        for c in reversed(ctxs):
            self.uncontract(c)
        return None

    def before_rollback_all(self, ctxs: list[Context]) -> None:
        """Before a rollback: raise Refused (nothing changed, the phase's status kept) if it would lose data.
        Every table is checked before any is touched."""

    def before_uncontract_all(self, ctxs: list[Context]) -> None:
        """Before undoing the contract step: raise Refused (nothing changed) if it could not finish."""

    def check_all(self, ctxs: list[Context]) -> list[str]:
        return [f"{c.m.label}: {p}" for c in ctxs for p in self.check(c)]

    def before_contract_all(self, ctxs: list[Context]) -> None:
        """Before the first contract step (after it there is no rollback): raise Refused if unsafe."""

    def reapply_all(self, ctxs: list[Context]) -> None:
        """`run N` of a phase already applied: put back what a step that stopped part-way (a rollback killed or
        out of lock budget) may have left changed. Idempotent; by default there is nothing to put back."""

    def before_expand_all(self, ctxs: list[Context]) -> None:
        for c in ctxs:
            self.before_expand(c)
