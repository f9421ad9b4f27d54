"""Running executions (engine/executor/, runtime.py, windows.py, breakers.py, worker.py): the
batch executor, the careful path, windows, circuit breakers, the worker process (crashes,
shutdown, supervision, recovered jobs, session timeouts)."""
