"""Optuna's tables (its RDBStorage schema: studies, trials, their params and values), in the
platform's own database, where each sweep's study lives. Created here, by ``migrate``, so that no
two processes race to create them at run time (tuneplex.sweeps.study opens them as they are)."""

from django.db import migrations


def create_optuna_tables(apps, schema_editor) -> None:
    from tuneplex.sweeps.study import open_storage

    # Optuna connects on its own: its tables are made (and its schema version stamped) on the
    # database this migration runs on, the test database included.
    open_storage(schema_editor.connection.settings_dict, create_tables=True)


class Migration(migrations.Migration):
    # Not in a transaction: on SQLite, Optuna's own connection would wait for the write lock a
    # migration's transaction holds.
    atomic = False

    dependencies = [("sweeps", "0001_initial")]

    operations = [migrations.RunPython(create_optuna_tables, migrations.RunPython.noop,
                                       elidable=False)]
