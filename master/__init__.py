"""The master process: a thin loop (server) over owners that each get a narrow interface, and the store.

Reading order: server.py wires everything and runs the loop and the group commit (commit, then ACK);
link.py is how any part sends; roster.py the connected slaves. Owners, top to bottom:
sessions.py (HELLO, HEARTBEAT, DISCONNECT, expiry, revoked keys), dispatch.py (credit, TICKET batches),
intake.py (RESULT, FAILURE, PROGRESS, CHUNK, validation hand-off), control.py (every CONTROL op),
pysweep.py (python sweeps), placement.py (where a sweep may run, shipped executables), stragglers.py,
housekeeping.py; all of them settle tasks through lifecycle.py, the one writer of task and ticket state,
over scheduler.py (the ticket table) and store.py (SQLite). allocation.py brings slaves as batch jobs
(batch.py speaks to the scheduler through PSI/J, alloc_files.py writes what the jobs read), told only the demand.
Beside the loop: http.py, collect.py, stats.py.
"""
