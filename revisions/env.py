"""Alembic environment: PostgreSQL through SQLAlchemy + psycopg (3), one short transaction per revision.

The database: `-x dsn=postgresql://...`, else $DATABASE_URL, else `sqlalchemy.url` in alembic.ini
(`-x dsn=demo`: the local demo server of `orchestrator demo`). Programmatic callers may instead set
`config.attributes["connection"]` (a SQLAlchemy connection) or `config.attributes["dsn"]`.

Revisions generated from a playbook (`orchestrator revisions generate`) run their phase through the
orchestrator, outside Alembic's transaction (autocommit block). Before Alembic reads its version table, the
generated chains are reconciled with the orchestrator's state table, so a phase run with `orchestrator run N`
counts as applied here too.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from orchestrator import revisions as ec

config = context.config

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# No autogenerate: schema changes here are playbook phases, not model diffs.
target_metadata = None


def run_migrations_offline() -> None:
    context.configure(url=ec.database_url(config), target_metadata=target_metadata, literal_binds=True,
                      transaction_per_migration=True, **ec.version_table_options(config))
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    ec.reconcile(connection, context.script, config)
    context.configure(connection=connection, target_metadata=target_metadata,
                      transaction_per_migration=True, **ec.version_table_options(config))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(ec.database_url(config), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
            if connection.in_transaction():  # e.g. `stamp` with no step: keep a version table it created
                connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
