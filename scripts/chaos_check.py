"""The end of a chaos run (scripts/chaos.py): the promise checked from the store, the collected CSV, the
slaves' acknowledgements and the process table; what broke it, and the counts of the run."""
from __future__ import annotations

import csv
import sqlite3
from collections import Counter
from pathlib import Path

import psutil

SWEEP = "chaos"


def expected(n: int) -> str:
    """Task n's output: what its command prints (see SPEC in scripts/chaos.py)."""
    return f"{n} {n * n % 1000003}"


def acknowledged(root: Path) -> set[int]:
    """Tickets whose successful results the master acknowledged, from the slaves' debug logs."""
    tickets: set[int] = set()
    for log in root.glob("slave-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "result_acknowledged" in line and "ok=True" in line:
                tickets.add(int(line.split("ticket=", 1)[1].split()[0]))
    return tickets


def logged_tickets(log: Path, event: str) -> set[int]:
    return {int(line.split("ticket=", 1)[1].split()[0]) for line in log.read_text(errors="replace").splitlines()
            if event in line and "ticket=" in line}


def check(root: Path, state: Path, tasks: int, orphans: list[int]) -> tuple[list[str], dict[str, int]]:
    """What broke the promise (empty: nothing), and the counts of the run."""
    problems: list[str] = []
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    if integrity != "ok":
        problems.append(f"SQLite integrity_check: {integrity}")
    rows = db.execute("SELECT idx, state, attempts, ticket FROM tasks WHERE sweep = ?", (SWEEP,)).fetchall()
    states = Counter(state for _, state, _, _ in rows)
    if len(rows) != tasks or states["done"] != tasks:
        problems.append(f"tasks by state {dict(states)}, want {tasks} done")
    results = dict(db.execute("SELECT task, data FROM results WHERE sweep = ? AND name = 'out'", (SWEEP,)))
    wrong = [n for n in range(tasks) if (results.get(n) or b"").decode().strip() != expected(n)]
    if wrong:
        problems.append(f"{len(wrong)} tasks with a wrong or missing result, e.g. {wrong[:5]}")
    tickets = {tid: (task, tstate) for tid, task, tstate in
               db.execute("SELECT id, task, state FROM tickets WHERE sweep = ?", (SWEEP,))}
    per_task = Counter(task for task, _ in tickets.values())
    for idx, _, attempts, winner in rows:
        if winner not in tickets or tickets[winner][0] != idx:
            problems.append(f"task {idx}: its result's ticket {winner} is not one of its tickets")
        if not 1 <= attempts <= per_task[idx]:
            problems.append(f"task {idx}: {attempts} attempts but {per_task[idx]} tickets")
    done_tickets = Counter(task for task, tstate in tickets.values() if tstate == "done")
    twice = [t for t, n in done_tickets.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} tasks with more than one ticket done, e.g. {twice[:5]}")
    # A result acknowledged is stored (its ticket won), or was a duplicate of one stored, or was refused for a
    # ticket the store never knew (dispatched by a master killed before its commit): never simply gone.
    acked = acknowledged(root)
    winners = {winner for _, _, _, winner in rows}
    duplicates = logged_tickets(root / "master.log", "duplicate_result")
    lost = [t for t in acked if t in tickets and t not in winners and t not in duplicates]
    if lost:
        problems.append(f"{len(lost)} acknowledged results neither stored nor duplicates, e.g. {lost[:5]}")
    collected = list(csv.DictReader(open(root / "out" / "chaos.csv", newline="")))
    ids = Counter(int(r["task"]) for r in collected)
    if sorted(ids) != list(range(tasks)) or max(ids.values(), default=0) != 1:
        problems.append(f"collected CSV: {len(collected)} rows for {len(ids)} tasks, want {tasks} once each")
    if any(r["out"] != expected(int(r["task"])) for r in collected):
        problems.append("collected CSV holds wrong results")
    if orphans:
        problems.append(f"{len(orphans)} worker processes left alive: {orphans[:5]}")
    counts = {"tickets": len(tickets), "reassigned": len(tickets) - tasks,
              "tickets_lost": sum(1 for _, s in tickets.values() if s == "lost"),
              "tickets_failed_or_timeout": sum(1 for _, s in tickets.values() if s in ("failed", "timeout")),
              "duplicates_suppressed": len(duplicates),
              "acknowledged": len(acked), "acknowledged_foreign": sum(1 for t in acked if t not in tickets),
              "results_lost": len(lost), "collected_twice": sum(1 for n in ids.values() if n > 1),
              "wrong_results": len(wrong), "orphaned_workers": len(orphans)}
    db.close()
    return problems, counts


def under(proc: psutil.Process, root: Path) -> bool:
    try:
        return proc.environ().get("TICKETFARM_WORKDIR", "").startswith(str(root))
    except psutil.Error:
        return False
