"""The step executor: runs the steps of executions the matcher and the scheduler enrolled.

- ``queue``: the execution queue (claims with leases, wake-ups through procrastinate).
- ``batch``: the batch loop: claims many executions, runs their due steps set-based
  (database actions) or concurrently (external actions), records them per batch.
- ``runner``: one execution at a time, for what the batch does not take on (start
  limits, failures and compensation, ``when``, ``delay.until``) and for operators;
  ``careful_step``: its one step's attempt (``when``, window, database or external).
- ``flow``: start-time and step-time flow control (rate, concurrency, debounce).
- ``compensation``: undo on failure, cancel, replay.
- ``plans``, ``context``, ``errors``: what the pieces share.

docs/architecture.md maps the whole pipeline to its files.
"""
