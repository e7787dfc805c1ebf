"""The `ticketfarm` command: init, master, run, submit, status, stats, slaves, collect, cancel, retry, forget, alloc, deploy."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, NoReturn

from master.collect import check_claims, collect
from master.config import (
    MasterConfig,
    load_master_config,
    master_config_path,
    write_default_master_config,
)
from master.stats import (
    SweepStats,
    all_sweep_stats,
    format_report,
    slave_stats,
    status_table,
    sweep_stats,
    table,
)
from master.store import Store
from ticketfarm import cli_alloc, cli_http, keys, messages
from ticketfarm.client.control import client_endpoint, control
from ticketfarm.client.progress import ProgressBar
from ticketfarm.client.statedir import default_state_dir, state_dir_for
from ticketfarm.errors import ConfigError, KeyFileError, MasterUnreachable, StateDirInUse, TicketfarmError
from ticketfarm.logs import configure_logging
from ticketfarm.spec import load_spec


def entry() -> NoReturn:
    """The `ticketfarm` command: `main`, then the process ends at once (see `exit_now`)."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End a finished command without tearing the interpreter down: by then its output is written, its store
    closed and its sockets gone, and freeing every module's objects only costs time (0.1-0.4 s on a busy machine:
    most of a `status`, and of `run --local` after its last result). With another thread still running, its
    normal exit waits for it."""
    if threading.active_count() > 1:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach the reader
            pass
    logging.shutdown()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_json)
    try:
        if args.state is None:
            local_run = getattr(args, "local", None) is not None and "TICKETFARM_STATE" not in os.environ
            args.state = state_dir_for(args.spec) if local_run else default_state_dir()
        return args.func(args)
    except ConfigError as exc:
        print(f"ticketfarm: {exc}", file=sys.stderr)
        return 2
    except MasterUnreachable as exc:
        print(f"ticketfarm: {exc}", file=sys.stderr)
        return 3
    except StateDirInUse as exc:
        print(f"ticketfarm: {exc}", file=sys.stderr)
        return 4
    except TicketfarmError as exc:  # any other refusal (e.g. results already removed): one line, no traceback
        print(f"ticketfarm: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketfarm", description="Parameter sweeps across many machines.")
    parser.add_argument("--state", type=Path, default=None,
                        help="master state directory (default: $TICKETFARM_STATE, else for `run SPEC --local` "
                             ".ticketfarm beside SPEC, else ./.ticketfarm)")
    parser.add_argument("--master", help="address of a running master (default: from the state dir's config)")
    parser.add_argument("--log-level", default=os.environ.get("TICKETFARM_LOG", "warning"))
    parser.add_argument("--log-json", action="store_true", help="logs as JSON lines")
    parser.add_argument("--http", default=os.environ.get("TICKETFARM_HTTP"), metavar="URL",
                        help="use this master's HTTP API (default: $TICKETFARM_HTTP, or http_bind of the config)")
    parser.add_argument("--token", help="HTTP API token (default: $TICKETFARM_TOKEN, or STATE/http.token)")
    parser.add_argument("--keys", type=Path, default=None,
                        help="dir with master.key and client.key_secret for CURVE (default: $TICKETFARM_KEYS, "
                             "or STATE/keys)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a default master config and fresh CURVE keys to review")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("keys", help="CURVE keys: add-slave NAME, authorize, revoke, list")
    keys.add_arguments(p)
    p.set_defaults(func=keys.run)
    p = sub.add_parser("master", help="run the master in the foreground")
    p.set_defaults(func=cmd_master)
    p = sub.add_parser("run", help="run a sweep to the end with a progress bar")
    p.add_argument("spec", type=Path)
    p.add_argument("--local", type=int, metavar="N", help="start a master and N local slaves in this process")
    p.add_argument("--slots", type=int, default=1, help="slots per local slave")
    p.add_argument("--out", type=Path, default=Path("ticketfarm-results"), help="where collected files go")
    p.add_argument("--http", dest="serve_http", metavar="HOST:PORT",
                   help="with --local: serve the HTTP API and dashboard at HOST:PORT (e.g. 127.0.0.1:8080)")
    p.add_argument("--retry-failed", action="store_true",
                   help="an existing sweep's failed tasks run again with fresh attempts; the spec may change "
                        "timeout and max_attempts")
    p.add_argument("--wait-for-slaves", action="store_true",
                   help="wait while no connected slave can run the sweep (without: exit 5 saying why)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("retry", help="queue a sweep's failed tasks (or one failed or cancelled task) again")
    p.add_argument("sweep")
    p.add_argument("--task", type=int, help="only this task (its index)")
    p.set_defaults(func=cmd_retry)
    p = sub.add_parser("forget", help="delete a finished or cancelled sweep with its results, so its name starts anew")
    p.add_argument("sweep")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("submit", help="submit a sweep to a running master and return")
    p.add_argument("spec", type=Path)
    p.add_argument("--callback", metavar="URL", help="status_callback_url: POSTed on every state change (HTTP API)")
    p.add_argument("--callback-secret", help="HMAC key for the callbacks (default: the master's callback_secret)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("status", help="progress of every sweep")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stats", help="statistics: sweeps, slaves, failed parameter sets")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("slaves", help="known slaves")
    p.set_defaults(func=cmd_slaves)
    p = sub.add_parser("collect", help="write a sweep's collected results")
    p.add_argument("sweep")
    p.add_argument("--out", type=Path, default=Path("ticketfarm-results"))
    p.add_argument("--remove", action="store_true", help="remove the results from the master afterwards")
    p.set_defaults(func=cmd_collect)
    p = sub.add_parser("cancel", help="cancel a sweep or one task (running tickets are killed)")
    p.add_argument("sweep")
    p.add_argument("--task", type=int, help="only this task (its index)")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("pause", help="pause a sweep (running tickets finish) or one task (its running ticket is killed)")
    p.add_argument("sweep")
    p.add_argument("--task", type=int, help="only this task (its index)")
    p.set_defaults(func=lambda args: cmd_pause(args, True))
    p = sub.add_parser("resume", help="resume a paused sweep or task")
    p.add_argument("sweep")
    p.add_argument("--task", type=int, help="only this task (its index)")
    p.set_defaults(func=lambda args: cmd_pause(args, False))
    p = sub.add_parser("prune", help="remove expired uncollected results now (see keep_days)")
    p.add_argument("--keep-days", type=float, help="instead of the configured keep_days")
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("http", help="serve a master's HTTP API and dashboard from this process (a master with "
                                    "http_bind starts one itself): needs the state dir's master.toml and state.db")
    p.add_argument("--bind", metavar="HOST:PORT", help="instead of master.toml's http_bind")
    p.set_defaults(func=cmd_http)
    p = sub.add_parser("token", help="HTTP API tokens: make one (printed once; only hashes are kept), add, revoke, list")
    p.add_argument("--write", action="store_true",
                   help="save it as STATE/http.token, the \"default\" token (replacing the previous one)")
    p.set_defaults(func=lambda args: cli_http.make_token(args.state, args.write))
    tokens = p.add_subparsers(dest="token_command")
    t = tokens.add_parser("add", help="a new named token with scopes (works at once, no restart)")
    t.add_argument("name")
    t.add_argument("--scope", action="append", dest="scopes", choices=("read", "submit", "admin"),
                   help="read, submit, admin (repeat; default: read and submit)")
    t.set_defaults(func=lambda args: cli_http.token_add(args.state, args.name, args.scopes or ["read", "submit"]))
    t = tokens.add_parser("revoke", help="a named token is refused from now on")
    t.add_argument("name")
    t.set_defaults(func=lambda args: cli_http.token_revoke(args.state, args.name))
    t = tokens.add_parser("list", help="named tokens and their scopes")
    t.set_defaults(func=lambda args: cli_http.token_list(args.state))
    cli_alloc.add_parsers(sub, lambda args: (_endpoint(args), _keys(args)))
    try:
        from ticketfarm.deploy import add_deploy_parser
    except ImportError:
        pass
    else:
        add_deploy_parser(sub)
    return parser


# -- commands -------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    path = master_config_path(args.state)
    made = keys.init_state_keys(args.state)
    for key in made:
        print(f"wrote {key}")
    if path.exists():
        print(f"{path} exists; not overwritten")
        return 0
    write_default_master_config(args.state)
    print(f"wrote {path}: review it, then start `ticketfarm master`\n"
          f"slaves need {keys.keys_dir(args.state) / 'master.key'} and a secret key: the shared "
          f"{keys.keys_dir(args.state) / 'slave.key_secret'}, or one per host (`ticketfarm keys add-slave HOST`)")
    return 0


def cmd_master(args: argparse.Namespace) -> int:
    if not master_config_path(args.state).exists():
        path = write_default_master_config(args.state)
        print(f"no master config found: wrote defaults to {path}; review it and start the master again",
              file=sys.stderr)
        return 2
    from master.server import Master  # only here: the other commands never pay for the master's imports

    config = load_master_config(args.state)
    master = Master(config, args.state)
    signal.signal(signal.SIGTERM, lambda *_: master.stop())
    signal.signal(signal.SIGINT, lambda *_: master.stop())
    print(f"ticketfarm master listening on {master.endpoint} (state {args.state})", file=sys.stderr, flush=True)
    if master.http is not None:
        print(f"ticketfarm HTTP API and dashboard on {master.http.url}/", file=sys.stderr, flush=True)
    try:
        master.serve()
    finally:
        master.close()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    sweep = load_spec(args.spec)
    check_claims(args.out, sweep.name, [rule.path for rule in sweep.collect])  # a collision stops it before it runs
    if args.local is None:
        return _run_remote(args, sweep)
    if args.local < 1:
        raise ConfigError("--local needs at least 1 slave")
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
        return 130
    if final and final.unrunnable and final.state not in ("finished", "cancelled"):
        return _unrunnable(final)
    return _finish_run(args.state, sweep.name, args.out, time.time() - started)


def _unrunnable(stats: SweepStats) -> int:
    print(f"ticketfarm: sweep {stats.name!r} is unrunnable: {stats.unrunnable}; its state is kept: start slaves that "
          "can run it, or run again with --wait-for-slaves to wait for them", file=sys.stderr)
    return 5


def _retry_failed(send: Callable[..., dict[str, Any]], sweep: Any) -> None:
    """--retry-failed: an existing sweep takes this spec and its failed tasks are queued again (a new one is not)."""
    reply = send("retry", sweep=sweep.name, spec=sweep.to_json())
    if reply.get("ok"):
        print(f"{sweep.name}: retrying {len(reply['tasks'])} failed task(s)", file=sys.stderr)
    elif reply.get("code") != "not_found":
        raise ConfigError(reply.get("error", "retry refused"))


def _run_remote(args: argparse.Namespace, sweep: Any) -> int:
    endpoint = _endpoint(args)
    if args.retry_failed:
        _retry_failed(lambda op, **f: control(endpoint, op, keys=_keys(args), **f), sweep)
    reply = _submit(args, endpoint, sweep)
    if not reply.get("ok"):
        raise ConfigError(reply.get("error", "submit refused"))
    bar = ProgressBar()
    started = time.time()
    while True:
        status = control(endpoint, "status", keys=_keys(args))
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
    return 1 if failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    api = cli_http.http_api(args, needed=bool(args.callback))
    if api is not None:
        return cli_http.submit(api, args.spec, args.callback, args.callback_secret)
    if args.callback:
        raise ConfigError("--callback needs the master's HTTP API (set http_bind, or pass --http URL)")
    sweep = load_spec(args.spec)
    reply = _submit(args, _endpoint(args), sweep)
    if not reply.get("ok"):
        raise ConfigError(reply.get("error", "submit refused"))
    print(f"{sweep.name}: {reply['state']} ({len(sweep.params)} tasks)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if (api := cli_http.http_api(args)) is not None:
        try:
            return cli_http.status(api)
        except MasterUnreachable:
            if args.http:
                raise
    rows = _live_or_stored(args, "status", lambda store: [asdict(s) for s in all_sweep_stats(store)])
    print(status_table(rows["sweeps"] if isinstance(rows, dict) else rows))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    if (api := cli_http.http_api(args)) is not None:
        try:
            return cli_http.stats(api)
        except MasterUnreachable:
            if args.http:
                raise
    report = _live_or_stored(args, "report", format_report)
    print(report["report"] if isinstance(report, dict) else report)
    return 0


def cmd_slaves(args: argparse.Namespace) -> int:
    with _open_store(args.state) as store:
        print(table(["slave", "platform", "slots", "state", "done", "failed", "busy s"],
                    [[s.name, s.platform, s.slots, s.state, s.done, s.failed, s.busy] for s in slave_stats(store)]))
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    if (api := cli_http.http_api(args)) is not None:
        try:
            return cli_http.collect(api, args.sweep, args.out, args.remove)
        except MasterUnreachable:
            if args.http:
                raise
    with _open_store(args.state) as store:
        row = store.sweep(args.sweep)
        if row is None:
            raise ConfigError(f"no sweep named {args.sweep!r} in {args.state}")
        for path in collect(store, args.state, row.sweep(), args.out):
            print(path)
    if args.remove:
        reply = _answer(args, "forget_results", sweep=args.sweep)
        if not reply.get("ok"):
            print(f"ticketfarm: {args.sweep}: results kept: {reply.get('error', 'refused')}", file=sys.stderr)
            return 1
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _control_verb(args, "cancel_task", "cancelled", sweep=args.sweep, task=args.task)
    if (api := cli_http.http_api(args)) is not None:
        return cli_http.cancel(api, args.sweep)
    reply = control(_endpoint(args), "cancel", keys=_keys(args), sweep=args.sweep)
    print(f"{args.sweep}: {'cancelled' if reply.get('ok') else 'not active'}")
    return 0 if reply.get("ok") else 1


def cmd_pause(args: argparse.Namespace, paused: bool) -> int:
    verb = "pause" if paused else "resume"
    if args.task is not None:
        return _control_verb(args, f"{verb}_task", f"{verb}d", sweep=args.sweep, task=args.task)
    return _control_verb(args, verb, f"{verb}d", sweep=args.sweep)


def cmd_http(args: argparse.Namespace) -> int:
    from master.web.process import serve

    return serve(args.state, _endpoint(args), args.keys, None, None, None, args.bind)


def cmd_prune(args: argparse.Namespace) -> int:
    fields = {} if args.keep_days is None else {"keep_days": args.keep_days}
    reply = control(_endpoint(args), "prune", keys=_keys(args), **fields)
    if not reply.get("ok"):
        print(f"ticketfarm: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"pruned {reply['results']} results of {len(reply['sweeps'])} sweeps, {reply['events']} events")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    fields = {"sweep": args.sweep} if args.task is None else {"sweep": args.sweep, "task": args.task}
    reply = _answer(args, "retry", **fields)
    if not reply.get("ok"):
        print(f"ticketfarm: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    if not reply["tasks"]:
        print(f"{args.sweep}: no failed tasks to retry")
        return 1
    print(f"{args.sweep}: queued again: task(s) {', '.join(map(str, reply['tasks']))}"
          f" (`ticketfarm run SPEC` or a running master runs them)")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    if not args.yes:
        answer = input(f"delete sweep {args.sweep!r} with all its tasks and results from {args.state}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    reply = _answer(args, "forget", sweep=args.sweep)
    if not reply.get("ok"):
        print(f"ticketfarm: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    print(f"{args.sweep}: forgotten; its name can start anew")
    return 0


def _answer(args: argparse.Namespace, op: str, **fields: Any) -> dict[str, Any]:
    """One control op on the running master or, when none answers, on the state dir by an in-process master."""
    if args.master or master_config_path(args.state).exists():
        try:
            return control(_endpoint(args), op, timeout=2.0, keys=_keys(args), **fields)
        except MasterUnreachable:
            if args.master:
                raise
    if not (args.state / "state.db").exists():
        raise ConfigError(f"{args.state}: no ticketfarm state here (no state.db); pass --state DIR")
    config = load_master_config(args.state) if master_config_path(args.state).exists() else MasterConfig()
    config.bind, config.http_bind = "tcp://127.0.0.1:*", ""  # nobody is meant to connect to this one
    from master.server import Master  # only here: the other commands never pay for the master's imports
    master = Master(config, args.state)
    try:
        return master.control.answer(b"", messages.Control(op, fields))[0]
    finally:
        master.close()


def _control_verb(args: argparse.Namespace, op: str, done: str, **fields: Any) -> int:
    """One control op on the running master; prints what happened or why not."""
    reply = control(_endpoint(args), op, keys=_keys(args), **fields)
    what = args.sweep if args.task is None else f"{args.sweep} task {args.task}"
    if not reply.get("ok"):
        print(f"ticketfarm: {what}: {reply.get('error', 'refused')}", file=sys.stderr)
        return 1
    print(f"{what}: {done}")
    return 0


# -- helpers ------------------------------------------------------------------------------
def _endpoint(args: argparse.Namespace) -> str:
    if args.master:
        return args.master
    return client_endpoint(load_master_config(args.state).bind)


def _submit(args: argparse.Namespace, endpoint: str, sweep: Any) -> dict[str, Any]:
    """CONTROL submit; a sweep too large for one message is refused here, not dropped by the master unseen."""
    fields = sweep.submit_fields()
    size = sum(map(len, fields.values()))
    limit = MasterConfig.max_message_size
    if master_config_path(args.state).exists():
        limit = load_master_config(args.state).max_message_size
    if size + 1024 > limit:
        raise ConfigError(f"sweep {sweep.name!r} is {size} bytes as a message, over the master's "
                          f"max_message_size ({limit}): raise it in master.toml, or submit through the HTTP API")
    return control(endpoint, "submit", keys=_keys(args), **fields)


def _keys(args: argparse.Namespace) -> keys.ClientKeys | None:
    """The client's CURVE keys: --keys, $TICKETFARM_KEYS or STATE/keys; None for an insecure master."""
    if not args.keys and master_config_path(args.state).exists() and load_master_config(args.state).insecure:
        return None
    try:
        return keys.client_keys_for(args.state, args.keys)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from None


class _open_store:
    """Read-only access to a state dir's store (works whether or not the master runs)."""

    def __init__(self, state_dir: Path):
        path = state_dir / "state.db"
        if not path.exists():
            raise ConfigError(f"{state_dir}: no ticketfarm state here (no state.db)")
        self.store = Store(path, readonly=True)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def _live_or_stored(args: argparse.Namespace, op: str, from_store: Any) -> Any:
    """Ask the running master; without one, read the store directly."""
    if args.master or master_config_path(args.state).exists():
        try:
            reply = control(_endpoint(args), op, timeout=2.0, keys=_keys(args))
            if reply.get("ok"):
                return reply
        except MasterUnreachable:
            if args.master:
                raise
    with _open_store(args.state) as store:
        return from_store(store)


if __name__ == "__main__":
    sys.exit(main())
