"""The project as a whole: the code's structure, migrations and the schema snapshot, statuses
against the schema, the docs against the tree, the demo and seed, least privilege, bounds on
one event's work, secrets."""
