"""The CLI's allocation verbs (`ticketfarm alloc add|list|pause|resume|remove`) and `ticketfarm slurm-script`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from master.alloc_files import QueueFiles
from master.batch import QueueSpec
from master.config import load_master_config
from master.store import Store
from ticketfarm.client.control import control
from ticketfarm.errors import ConfigError, MasterUnreachable

#: Gives the running master's endpoint and the client keys for the parsed arguments (from ticketfarm.cli).
Connect = Callable[[argparse.Namespace], tuple[str, Any]]


def walltime(text: str) -> float:
    """Seconds from "3600", "90m", "2h" or "[D-]HH:MM:SS"."""
    try:
        if text[-1:] in ("s", "m", "h"):
            return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]
        if ":" in text:
            days, _, clock = text.rpartition("-")
            parts = [float(p) for p in clock.split(":")]
            while len(parts) < 3:
                parts.insert(0, 0.0)
            return (float(days or 0) * 24 + parts[0]) * 3600 + parts[1] * 60 + parts[2]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"walltime {text!r}: seconds, 90m, 2h or HH:MM:SS") from None


def _queue_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", default="slurm", help="scheduler, as a PSI/J executor name (default: slurm)")
    p.add_argument("--partition", default="", help="partition / queue of the scheduler")
    p.add_argument("--account", default="", help="account or project charged")
    p.add_argument("--walltime", type=walltime, default=3600.0, help="time limit per job: seconds, 90m, 2h, HH:MM:SS")
    p.add_argument("--slaves-per-job", type=int, default=1, help="slaves started by one job")
    p.add_argument("--slots", type=int, default=1, help="worker slots (CPUs) per slave")
    p.add_argument("--extra-arg", action="append", default=[], metavar="--KEY=VALUE",
                   help="another scheduler option for the job (repeatable)")
    p.add_argument("--setup", type=Path, help="file of shell lines run before the slave (modules, venv)")
    p.add_argument("--handback", type=float, default=60.0, help="seconds before the walltime to hand tickets back")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle slave waits before leaving")


def _spec(args: argparse.Namespace, name: str) -> QueueSpec:
    data = {"name": name, "kind": args.kind, "partition": args.partition, "account": args.account,
            "walltime": args.walltime, "slaves_per_job": args.slaves_per_job, "slots_per_slave": args.slots,
            "extra_args": args.extra_arg, "setup": args.setup.read_text() if args.setup else "",
            "handback": args.handback, "idle_timeout": args.idle_timeout}
    for key in ("max_pending", "max_running"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    return QueueSpec.parse(data, "command line")


def add_parsers(sub: Any, connect: Connect) -> None:
    p = sub.add_parser("alloc", help="allocation queues: slaves as batch jobs (add, list, pause, resume, remove)")
    verbs = p.add_subparsers(dest="alloc_verb", required=True)
    v = verbs.add_parser("add", help="add a queue: the master submits jobs running slaves while work is queued")
    v.add_argument("name")
    _queue_arguments(v)
    v.add_argument("--max-pending", type=int, help="jobs waiting in the scheduler at most (default 2)")
    v.add_argument("--max-running", type=int, help="jobs submitted and not ended at most (default 4)")
    v.set_defaults(func=lambda args: _add(args, connect))
    v = verbs.add_parser("list", help="each queue with its jobs: state, exit code, reason; refused submissions")
    v.add_argument("--json", action="store_true", help="the master's answer as JSON")
    v.set_defaults(func=lambda args: _list(args, connect))
    for verb, text in (("pause", "submit no more jobs (running ones go on)"), ("resume", "submit again"),
                       ("remove", "cancel every job of the queue and forget it")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("name")
        v.set_defaults(func=lambda args, verb=verb: _verb(args, connect, verb))
    p = sub.add_parser("slurm-script", help="print a Slurm batch script that runs slaves (submit it with sbatch)")
    p.add_argument("--name", default="manual", help="names its files and slaves (default: manual)")
    _queue_arguments(p)
    p.set_defaults(func=_slurm_script)


def _ask(args: argparse.Namespace, connect: Connect, **fields: Any) -> dict[str, Any] | None:
    endpoint, keys = connect(args)
    reply = control(endpoint, "alloc", keys=keys, **fields)
    if not reply.get("ok"):
        print(f"ticketfarm alloc: {reply.get('error', 'refused')}", file=sys.stderr)
        return None
    return reply


def _add(args: argparse.Namespace, connect: Connect) -> int:
    reply = _ask(args, connect, action="add", queue=_spec(args, args.name).to_dict())
    if reply is None:
        return 1
    print(f"allocation queue {args.name} added")
    return 0


def _verb(args: argparse.Namespace, connect: Connect, verb: str) -> int:
    if _ask(args, connect, action=verb, queue=args.name) is None:
        return 1
    print(f"allocation queue {args.name}: {verb}{'d' if verb.endswith('e') else 'ed'}")
    return 0


def _list(args: argparse.Namespace, connect: Connect) -> int:
    try:
        reply = _ask(args, connect, action="list")
    except MasterUnreachable:
        reply = _stored_listing(args.state)  # what the store says: the master may have died mid-run
        print("ticketfarm alloc: the master does not answer; as last stored:", file=sys.stderr)
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    if not reply["queues"]:
        print("no allocation queues")
    for q in reply["queues"]:
        print(format_queue(q))
    calls = reply["scheduler_calls"]
    print(f"scheduler calls: {calls['submit']} submit, {calls['cancel']} cancel")
    return 0


def _stored_listing(state: Path) -> dict[str, Any]:
    path = state / "state.db"
    if not path.exists():
        raise ConfigError(f"{state}: no ticketfarm state here (no state.db): pass --state DIR of the master's "
                          "state dir")
    store = Store(path, readonly=True)
    try:
        jobs = store.alloc_jobs()
        queues = [dict(q, jobs=[dict(j, slaves_seen=[]) for j in jobs if j["queue"] == q["name"]])
                  for q in store.alloc_queues()]
    finally:
        store.close()
    return {"ok": True, "queues": queues, "scheduler_calls": {"submit": "?", "cancel": "?"}}


def format_queue(q: dict[str, Any]) -> str:
    """A queue and its jobs as a few human lines."""
    s = q["spec"]
    live = [j for j in q["jobs"] if j["ended"] is None]
    where = "/".join(x for x in (s["partition"], s["account"]) if x) or "default partition"
    head = (f"{q['name']}: {s['kind']} {where}, walltime {s['walltime']:g}s, {s['slaves_per_job']} slave(s) x "
            f"{s['slots_per_slave']} slot(s) per job, {len(live)} job(s) live{' - PAUSED' if q['paused'] else ''}")
    lines = [head]
    if q["error"]:
        retry = max(0.0, (q["retry_at"] or 0) - time.time())
        lines.append(f"  submission refused ({q['errors']}x, next try in {retry:.0f}s): {q['error'].strip()}")
    for j in q["jobs"]:
        when = time.strftime("%H:%M:%S", time.localtime(j["submitted"]))
        text = f"  job {j['id']} ({j['native_id'] or 'no id yet'}) {j['state']}, submitted {when}"
        if j["ended"] is None:
            text += f", slaves seen {len(j['slaves_seen'])}/{j['slaves']}"
        if j["exit_code"] is not None:
            text += f", exit {j['exit_code']}"
        if j["reason"]:
            text += f": {j['reason'].strip()}"
        lines.append(text)
    return "\n".join(lines)


def _slurm_script(args: argparse.Namespace) -> int:
    """A readable batch script for users who submit slaves themselves; it holds paths to the key, not the key."""
    config = load_master_config(args.state)
    spec = _spec(args, args.name)
    if spec.kind != "slurm":
        raise ConfigError("slurm-script writes Slurm scripts only (--kind slurm)", "kind")
    files = QueueFiles(args.state, config.bind, config.insecure, config.heartbeat_interval, config.liveness)
    paths = files.prepare(spec)
    hours, rest = divmod(int(spec.walltime), 3600)
    lines = ["#!/bin/bash", f"#SBATCH --job-name=ticketfarm-{spec.name}",
             f"#SBATCH --time={hours}:{rest // 60:02d}:{rest % 60:02d}",
             f"#SBATCH --ntasks={spec.slaves_per_job}", f"#SBATCH --cpus-per-task={spec.slots_per_slave}"]
    lines += [f"#SBATCH --{opt}={getattr(spec, opt)}" for opt in ("partition", "account") if getattr(spec, opt)]
    lines += [f"#SBATCH {arg}" for arg in spec.extra_args]
    lines += ["# Written by `ticketfarm slurm-script`; submit it with sbatch. The slaves read their CURVE key from",
              f"# {paths.slave_config.parent} (mode 0700): the master's state dir must be reachable from the nodes.",
              f"source {paths.setup}",
              "# Single quotes: each slave expands its own rank ($SLURM_PROCID), not this script once for all.",
              f"srun {spec.slave_command} --config {paths.slave_config} "
              f"--name '{spec.name}-$SLURM_JOB_ID-$SLURM_PROCID'"]
    print("\n".join(lines))
    return 0
