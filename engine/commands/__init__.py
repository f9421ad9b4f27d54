"""The ``crmflow`` commands, one module per command group; ``engine/cli.py`` builds the
parser from each module's ``register`` and runs the chosen command.

- ``entities``: migrate, watch, unwatch, entities
- ``workflow``: workflow apply/list/show/activate/pause/archive/versions/replay-events/run
- ``executions``: executions list/show/retry/cancel
- ``examples``: seed, demo, bench
- ``apikey``: apikey create/list/revoke
- ``service``: api, worker, prune
- ``common``: what they share (consoles, ``CliError``, JSON output, connections)
"""
