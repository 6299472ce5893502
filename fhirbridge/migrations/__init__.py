"""Alembic migrations of the database schema in fhirbridge/store/schema.py.

This package is Alembic's script directory (env.py, script.py.mako, versions/); fhirbridge.db
configures Alembic in code, so no alembic.ini is needed and it works the same from a checkout,
a wheel or the container. Apply with `fhirbridge db upgrade`.

Changing schema.py needs a revision: `fhirbridge db revision -m "what and why"` writes one
from the difference between schema.py and the latest revision (review it: autogenerate misses
renames and some constraint changes). tests/store/test_migrations.py fails while schema.py and
the migrated database differ.
"""
