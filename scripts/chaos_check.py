"""The end of a chaos run (scripts/chaos.py): the promise checked from the store, the collected CSV, the
slaves' acknowledgements and the process table; what broke it, and the counts of the run."""
from __future__ import annotations

import csv
import sqlite3
from collections import Counter
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

SWEEP = "chaos"


def expected(n: int) -> str:
    """Task n's output: what its command prints (see SPEC in scripts/chaos.py)."""
    return f"{n} {n * n % 1000003}"


def acknowledged(logs: list[Path]) -> set[int]:
    """Tickets whose successful results the master acknowledged, from the slaves' debug logs."""
    tickets: set[int] = set()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "result_acknowledged" in line and "ok=True" in line:
                tickets.add(int(line.split("ticket=", 1)[1].split()[0]))
    return tickets


def logged_tickets(log: Path, event: str) -> set[int]:
    return {int(line.split("ticket=", 1)[1].split()[0]) for line in log.read_text(errors="replace").splitlines()
            if event in line and "ticket=" in line}


def check(root: Path, state: Path, tasks: int, orphans: list[int],
          slave_logs: list[Path]) -> tuple[list[str], dict[str, int | str]]:
    """What broke the promise (empty: nothing), and the counts of the run."""
    problems: list[str] = []
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    counts_integrity = integrity
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
    acked = acknowledged(slave_logs)
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
    ended = Counter(s for _, s in tickets.values() if s not in ("done", "cancelled", "running"))
    counts = {"tickets": len(tickets), "reassigned": len(tickets) - tasks, "tickets_ended_without_result":
              sum(ended.values()), **{f"tickets_{s}": n for s, n in sorted(ended.items())},
              "duplicates_suppressed": log_lines(root / "master.log", "duplicate_result"),
              "acknowledged": len(acked), "acknowledged_foreign": sum(1 for t in acked if t not in tickets),
              "results_lost": len(lost), "collected_twice": sum(1 for n in ids.values() if n > 1),
              "wrong_results": len(wrong), "orphaned_workers": len(orphans), "integrity": counts_integrity}
    db.close()
    return problems, counts


def under(proc: psutil.Process, root: Path) -> bool:
    try:
        return proc.environ().get("TICKETFARM_WORKDIR", "").startswith(str(root))
    except psutil.Error:
        return False


def log_lines(log: Path, event: str, offset: int = 0) -> int:
    """How many `event` lines the log holds from byte `offset` on."""
    with open(log, "rb") as fh:
        fh.seek(offset)
        return sum(1 for line in fh.read().decode(errors="replace").splitlines() if f" {event} " in line)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text (the master's CONTROL op `metrics`) as samples by name and labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str) -> int:
    return int(sum(v for (n, _), v in samples.items() if n == name))


def by_cause(samples: Samples, name: str) -> Counter[str]:
    return Counter({dict(labels)["cause"]: int(v) for (n, labels), v in samples.items() if n == name})


def compare_metrics(root: Path, state: Path, counts: dict[str, int | str],
                    runs: list[dict]) -> tuple[str, list[str]]:
    """The master's promise metrics beside this run's own counts: a table, and where they disagree.

    Counters start from zero with each master process, so the sums over the master runs are approximate both ways:
    a SIGKILLed master's last events may come after its last scrape, and it may have counted a ticket it ended
    whose new state it had not committed yet (the next master ends it again). The last run (never killed, scraped
    after the sweep ended) must match the store and its own stretch of master.log exactly.
    """
    problems: list[str] = []
    summed = {name: sum(total(r["metrics"], name) for r in runs) for name in (
        "ticketfarm_reassignments_total", "ticketfarm_tickets_lost_total",
        "ticketfarm_duplicate_results_suppressed_total")}
    causes = sum((by_cause(r["metrics"], "ticketfarm_tickets_lost_total") for r in runs), Counter())
    last = runs[-1]
    last_dups = log_lines(root / "master.log", "duplicate_result", last["offset"])
    metric_dups = total(last["metrics"], "ticketfarm_duplicate_results_suppressed_total")
    metric_lost = total(last["metrics"], "ticketfarm_tickets_lost_total")
    if metric_dups != last_dups:
        problems.append(f"last master: {metric_dups} duplicates suppressed in its metrics, {last_dups} "
                        f"duplicate_result lines in its log")
    if summed["ticketfarm_duplicate_results_suppressed_total"] > counts["duplicates_suppressed"]:
        problems.append("the masters' metrics count more duplicates than their logs name")
    db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    ended = db.execute("SELECT count(*) FROM tickets WHERE sweep = ? AND finished >= ? AND state NOT IN "
                       "('done', 'cancelled', 'running')", (SWEEP, last["started"])).fetchone()[0]
    db.close()
    if metric_lost != ended:
        problems.append(f"last master: {metric_lost} tickets lost in its metrics, {ended} tickets it ended without "
                        f"a result in the store")
    rows = [("tickets reassigned", counts["reassigned"], summed["ticketfarm_reassignments_total"]),
            ("tickets ended without a result", counts["tickets_ended_without_result"],
             summed["ticketfarm_tickets_lost_total"]),
            *((f"  by cause: {cause}", "", n) for cause, n in sorted(causes.items())),
            *((f"  by store state: {k[8:]}", v, "") for k, v in counts.items()
              if k.startswith("tickets_") and k != "tickets_ended_without_result"),
            ("duplicate results suppressed", counts["duplicates_suppressed"],
             summed["ticketfarm_duplicate_results_suppressed_total"]),
            ("  last master run: lost / duplicates", f"{ended} / {last_dups}", f"{metric_lost} / {metric_dups}"),
            ("acknowledged results lost (must be 0)", counts["results_lost"], ""),
            ("tasks collected twice (must be 0)", counts["collected_twice"], ""),
            ("wrong results collected (must be 0)", counts["wrong_results"], ""),
            ("orphaned workers left (must be 0)", counts["orphaned_workers"], ""),
            ("SQLite integrity_check", counts["integrity"], "")]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}{'chaos (store, logs)':>22}{f'master metrics ({len(runs)} runs)':>28}"]
    lines += [f"{name:<{width}}{str(ours):>22}{str(theirs):>28}" for name, ours, theirs in rows]
    return "\n".join(lines), problems
