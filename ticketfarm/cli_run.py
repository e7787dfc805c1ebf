"""The CLI's `run` and `submit`: a sweep from its spec to the master, its progress, and its collected results."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from master.collect import check_claims, collect
from master.config import MasterConfig, load_master_config, master_config_path
from master.stats import SweepStats, format_report, sweep_stats
from master.store import Store
from ticketfarm import cli_http, exitcodes, messages
from ticketfarm.cli_options import client_keys, endpoint
from ticketfarm.client.control import control
from ticketfarm.client.progress import ProgressBar
from ticketfarm.errors import ApiRefused, ConfigError, MasterRefused
from ticketfarm.spec import Sweep, files_left_behind, load_spec


def cmd_run(args: argparse.Namespace) -> int:
    sweep = load_checked_spec(args.spec)
    check_claims(args.out, sweep.name, [rule.path for rule in sweep.collect])  # a collision stops it before it runs
    if args.local is None:
        return _run_remote(args, sweep)
    if args.local < 1:
        raise ConfigError(f"--local {args.local}: a local run needs at least 1 slave (--local alone: one per core)",
                          field="local")
    if not (args.state / "state.db").exists():
        print(f"new state dir {args.state} for {sweep.name} (--state DIR to choose another)", file=sys.stderr)
    from ticketfarm.client.local import LocalCluster  # imports the master: only `run --local` needs it

    bar = ProgressBar()
    started = time.time()
    cluster = LocalCluster(args.state, args.local, slots=args.slots, log_level=args.log_level,
                           http_bind=args.serve_http)
    if cluster.master.http is not None:
        print(f"dashboard: {cluster.master.http.url}/", file=sys.stderr, flush=True)
    interrupted = False
    final = None

    def interrupt(*_: Any) -> None:
        # The loop stops between two messages, never inside a store transaction; a second Ctrl-C stops at once.
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cluster.master.stop()

    signal.signal(signal.SIGINT, interrupt)
    try:
        if args.retry_failed:
            _retry_failed(lambda op, **f: cluster.master.control.answer(b"", messages.Control(op, f))[0], sweep)
        state = cluster.master.submit(sweep)
        if state != "submitted":
            print(f"resuming sweep {sweep.name} ({state}) from {args.state}", file=sys.stderr)
        store = cluster.master.store

        def tick() -> None:
            stats = sweep_stats(store, sweep.name)
            if stats:
                bar.show(stats)

        cluster.run_until(lambda: cluster.master.sweep_done(sweep.name)
                          or (not args.wait_for_slaves and bool(cluster.master.unrunnable(sweep.name))), tick)
        final = sweep_stats(store, sweep.name)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        cluster.close(interrupted)
    if final:
        bar.show(final, force=True)
    bar.finish()
    if interrupted:
        print(f"interrupted: state kept in {args.state}; run the same command again to resume", file=sys.stderr)
        return exitcodes.INTERRUPTED.code
    if final and final.unrunnable and final.state not in ("finished", "cancelled"):
        return _unrunnable(final)
    return _finish_run(args.state, sweep.name, args.out, time.time() - started)


def _unrunnable(stats: SweepStats) -> int:
    print(f"ticketfarm: sweep {stats.name!r} is unrunnable: {stats.unrunnable}; its state is kept: start slaves that "
          "can run it, or run again with --wait-for-slaves to wait for them", file=sys.stderr)
    return exitcodes.UNRUNNABLE.code


def _retry_failed(send: Callable[..., dict[str, Any]], sweep: Any) -> None:
    """--retry-failed: an existing sweep takes this spec and its failed tasks are queued again (a new one is not)."""
    reply = send("retry", sweep=sweep.name, spec=sweep.to_json())
    if reply.get("ok"):
        print(f"{sweep.name}: retrying {len(reply['tasks'])} failed task(s)", file=sys.stderr)
    elif reply.get("code") != "not_found":
        raise refused(reply, sweep.name)


def _run_remote(args: argparse.Namespace, sweep: Any) -> int:
    address = endpoint(args)
    if args.retry_failed:
        _retry_failed(lambda op, **f: control(address, op, keys=client_keys(args), **f), sweep)
    reply = _submit(args, address, sweep)
    if not reply.get("ok"):
        raise refused(reply, sweep.name)
    bar = ProgressBar()
    started = time.time()
    while True:
        status = control(address, "status", keys=client_keys(args))
        mine = [SweepStats(**s) for s in status["sweeps"] if s["name"] == sweep.name]
        if mine:
            bar.show(mine[0])
            if mine[0].state in ("finished", "cancelled"):
                break
            if mine[0].unrunnable and not args.wait_for_slaves:
                bar.finish()
                return _unrunnable(mine[0])
        time.sleep(0.5)
    bar.finish()
    return _finish_run(args.state, sweep.name, args.out, time.time() - started)


def _finish_run(state_dir: Path, name: str, out: Path, wall: float) -> int:
    store = Store(state_dir / "state.db", readonly=True)
    try:
        row = store.sweep(name)
        assert row is not None
        written = collect(store, state_dir, row.sweep(), out)
        print(format_report(store, [name]))
        print(f"\nwall time {wall:.1f}s; collected: {', '.join(str(p) for p in written)}")
        failed = store.task_counts(name).get("failed", 0)
    finally:
        store.close()
    if failed:
        print(f"ticketfarm: {failed} task(s) of {name} failed (reasons above): fix the cause, then "
              f"`ticketfarm retry {name}` or `run SPEC --retry-failed` runs only them", file=sys.stderr)
    return exitcodes.FAILED.code if failed else exitcodes.OK.code


def cmd_submit(args: argparse.Namespace) -> int:
    api = cli_http.http_api(args, needed=bool(args.callback))
    if api is not None:
        return cli_http.submit(api, args.spec, args.callback, args.callback_secret)
    if args.callback:
        raise ConfigError("--callback needs the master's HTTP API: set http_bind in master.toml, or pass --http URL",
                          field="callback")
    sweep = load_checked_spec(args.spec)
    reply = _submit(args, endpoint(args), sweep)
    if not reply.get("ok"):
        raise refused(reply, sweep.name)
    print(f"{sweep.name}: {reply['state']} ({len(sweep.params)} tasks)")
    return 0


def refused(reply: dict[str, Any], sweep: str, task: int | None = None) -> MasterRefused:
    """The master's refusal of a request about a sweep (or one of its tasks) as an error saying what to do next,
    unless the master's own message already names a command to run."""
    message = reply.get("error") or f"{sweep}: refused"
    code = reply.get("code")
    if "`ticketfarm " in message or code not in ("not_found", "conflict"):
        return MasterRefused(message)
    if code == "not_found" and task is None:
        step = "`ticketfarm status` lists the sweeps"
    elif task is None:
        step = "`ticketfarm status` shows each sweep's state"
    else:
        step = f"`ticketfarm tasks {sweep}` shows its tasks and their states"
    return MasterRefused(f"{message}; {step}")


#: What to do after the HTTP API refused a request for want of a token, or of a token's scope.
TOKEN_STEPS = {
    "unauthorized": "pass --token TOKEN (or $TICKETFARM_TOKEN); `ticketfarm token --write` on the master's state dir "
                    "makes STATE/http.token",
    "forbidden": "use a token with that scope: `ticketfarm token add NAME --scope read --scope submit --scope admin`",
}


def explained(exc: BaseException, sweep: str | None) -> str:
    """An error as the CLI prints it: the HTTP API's refusals get the next step the master's would."""
    if isinstance(exc, ApiRefused):
        if exc.code in TOKEN_STEPS:
            return f"{exc}; {TOKEN_STEPS[exc.code]}"
        if sweep is not None:
            return str(refused({"error": str(exc), "code": exc.code}, sweep))
    return str(exc) or "interrupted"


# -- helpers ------------------------------------------------------------------------------
def load_checked_spec(path: Path) -> Sweep:
    """The spec, with a note when its parameters name files beside it that its workers will not see."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file (a relative path is taken from {Path.cwd()}): give the path "
                          "of a sweep spec (TOML; README, \"Sweep spec\")")
    sweep = load_spec(path)
    behind = files_left_behind(sweep, path.parent)
    if behind:
        key, value = behind[0]
        more = f" (and {len(behind) - 1} more)" if len(behind) > 1 else ""
        print(f"note: parameter {key} = {value!r}{more} names a file beside {path}, but each ticket runs in a "
              f"fresh work dir of its own, where it is not: set cwd = \"spec\" in {path} to run there, or ship it "
              "with [[inputs]]", file=sys.stderr)
    return sweep


def _submit(args: argparse.Namespace, address: str, sweep: Any) -> dict[str, Any]:
    """CONTROL submit; a sweep too large for one message is refused here, not dropped by the master unseen."""
    fields = sweep.submit_fields()
    size = sum(map(len, fields.values()))
    limit = MasterConfig.max_message_size
    if master_config_path(args.state).exists():
        limit = load_master_config(args.state).max_message_size
    if size + 1024 > limit:
        raise ConfigError(f"sweep {sweep.name!r} is {size} bytes as a message, over the master's "
                          f"max_message_size ({limit}): raise it in master.toml, or submit through the HTTP API")
    return control(address, "submit", keys=client_keys(args), **fields)
