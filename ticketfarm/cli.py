"""The `ticketfarm` command: its parser and verbs (init, master, run, submit, collect, cancel, retry, forget, ...)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from master.collect import collect
from master.config import (
    MasterConfig,
    load_master_config,
    master_config_path,
    write_default_master_config,
)
from master.store import Store
from ticketfarm import __version__, cli_alloc, cli_http, cli_views, exitcodes, keys, messages
from ticketfarm.cli_run import cmd_run, cmd_submit, explained, refused
from ticketfarm.cli_options import (
    VerbParser,
    add_global_options,
    bare_local,
    check_log_level,
    client_keys,
    core_count,
    endpoint,
)
from ticketfarm.client.control import control
from ticketfarm.client.statedir import default_state_dir, state_dir_for
from ticketfarm.errors import ConfigError, MasterRefused, MasterUnreachable, TicketfarmError
from ticketfarm.logs import configure_logging
from ticketfarm.parallel import command as parallel_command


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
    args = build_parser().parse_args(bare_local(sys.argv[1:] if argv is None else argv))
    try:
        configure_logging(check_log_level(args.log_level), args.log_json)
        if args.state is None:
            local_run = getattr(args, "local", None) is not None and "TICKETFARM_STATE" not in os.environ
            args.state = state_dir_for(args.spec) if local_run else default_state_dir()
        return args.func(args)
    except (TicketfarmError, KeyboardInterrupt) as exc:
        print(f"ticketfarm: {explained(exc, getattr(args, 'sweep', None))}", file=sys.stderr)
        return exitcodes.for_error(exc).code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketfarm", description="Parameter sweeps across many machines.",
                                     epilog="Options of the first group work before or after the verb. "
                                            "Exit codes: docs/CLI.md.")
    parser.add_argument("--version", action="version", version=f"ticketfarm {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=VerbParser)

    p = sub.add_parser("init", help="write a default master config and fresh CURVE keys to review")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("keys", help="CURVE keys: add-slave NAME, authorize, revoke, list")
    keys.add_arguments(p)
    p.set_defaults(func=keys.run)
    p = sub.add_parser("master", help="run the master in the foreground")
    p.set_defaults(func=cmd_master)
    p = sub.add_parser("run", help="run a sweep to the end with a progress bar")
    p.add_argument("spec", type=Path)
    p.add_argument("--local", type=int, metavar="N", help="start a master and N local slaves in this process "
                                                          f"(--local alone: one per core, here {core_count()})")
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
    for verb, text, func in (("status", "progress of every sweep", cli_views.cmd_status),
                             ("stats", "statistics: sweeps, slaves, failed parameter sets", cli_views.cmd_stats),
                             ("slaves", "known slaves", cli_views.cmd_slaves),
                             ("tasks", "each task of a sweep: state, attempts, slave, elapsed, exit code, reason",
                              cli_views.cmd_tasks)):
        p = sub.add_parser(verb, help=text)
        if verb == "tasks":
            p.add_argument("sweep")
        cli_views.add_format_option(p)
        p.set_defaults(func=func)
    p = sub.add_parser("collect", help="write a sweep's collected results")
    p.add_argument("sweep")
    p.add_argument("--out", type=Path, default=Path("ticketfarm-results"))
    p.add_argument("--remove", action="store_true", help="remove the results from the master afterwards")
    p.set_defaults(func=cmd_collect)
    for verb, text, func in (
            ("cancel", "cancel a sweep or one task (running tickets are killed)", cmd_cancel),
            ("pause", "pause a sweep (running tickets finish) or one task (its running ticket is killed)",
             lambda args: cmd_pause(args, True)),
            ("resume", "resume a paused sweep or task", lambda args: cmd_pause(args, False))):
        p = sub.add_parser(verb, help=text)
        p.add_argument("sweep")
        p.add_argument("--task", type=int, help="only this task (its index)")
        p.set_defaults(func=func)
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
    cli_alloc.add_parsers(sub, lambda args: (endpoint(args), client_keys(args)))
    p = sub.add_parser("completion", help="print a shell completion script: bash or zsh (see docs/CLI.md)")
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=cmd_completion)
    parallel_command.add_parser(sub)
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
        raise ConfigError(f"no master config in {args.state}: wrote the defaults to {path}; review it, then run "
                          f"`ticketfarm --state {args.state} master` again")
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
            raise refused({"error": f"no sweep named {args.sweep!r} in {args.state}", "code": "not_found"},
                          args.sweep)
        for path in collect(store, args.state, row.sweep(), args.out):
            print(path)
    if args.remove:
        reply = _answer(args, "forget_results", sweep=args.sweep)
        if not reply.get("ok"):
            raise MasterRefused(f"{args.sweep}: results kept: {reply.get('error', 'refused')}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _control_verb(args, "cancel_task", "cancelled", sweep=args.sweep, task=args.task)
    if (api := cli_http.http_api(args)) is not None:
        return cli_http.cancel(api, args.sweep)
    return _control_verb(args, "cancel_sweep", "cancelled", sweep=args.sweep)


def cmd_pause(args: argparse.Namespace, paused: bool) -> int:
    verb = "pause" if paused else "resume"
    if args.task is not None:
        return _control_verb(args, f"{verb}_task", f"{verb}d", sweep=args.sweep, task=args.task)
    return _control_verb(args, verb, f"{verb}d", sweep=args.sweep)


def cmd_http(args: argparse.Namespace) -> int:
    from master.web.process import serve

    return serve(args.state, endpoint(args), args.keys, None, None, None, args.bind)


def cmd_prune(args: argparse.Namespace) -> int:
    fields = {} if args.keep_days is None else {"keep_days": args.keep_days}
    reply = control(endpoint(args), "prune", keys=client_keys(args), **fields)
    if not reply.get("ok"):
        raise MasterRefused(reply.get("error", "prune refused"))
    print(f"pruned {reply['results']} results of {len(reply['sweeps'])} sweeps, {reply['events']} events")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    fields = {"sweep": args.sweep} if args.task is None else {"sweep": args.sweep, "task": args.task}
    reply = _answer(args, "retry", **fields)
    if not reply.get("ok"):
        raise refused(reply, args.sweep, args.task)
    if not reply["tasks"]:
        print(f"{args.sweep}: no failed tasks to retry (`ticketfarm tasks {args.sweep}` shows each task's state)")
        return exitcodes.FAILED.code
    print(f"{args.sweep}: queued again: task(s) {', '.join(map(str, reply['tasks']))}"
          f" (`ticketfarm run SPEC` or a running master runs them)")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    if not args.yes:
        answer = input(f"delete sweep {args.sweep!r} with all its tasks and results from {args.state}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return exitcodes.FAILED.code
    reply = _answer(args, "forget", sweep=args.sweep)
    if not reply.get("ok"):
        raise refused(reply, args.sweep)
    print(f"{args.sweep}: forgotten; its name can start anew")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab  # only here: nothing else needs it

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def _answer(args: argparse.Namespace, op: str, **fields: Any) -> dict[str, Any]:
    """One control op on the running master or, when none answers, on the state dir by an in-process master."""
    if args.master or master_config_path(args.state).exists():
        try:
            return control(endpoint(args), op, timeout=2.0, keys=client_keys(args), **fields)
        except MasterUnreachable:
            if args.master:
                raise
    if not (args.state / "state.db").exists():
        raise ConfigError(f"{args.state}: no ticketfarm state here (no state.db) and no master answers: pass "
                          "--state DIR of the sweep's state dir (a local run keeps it beside the spec)")
    config = load_master_config(args.state) if master_config_path(args.state).exists() else MasterConfig()
    config.bind, config.http_bind = "tcp://127.0.0.1:*", ""  # nobody is meant to connect to this one
    from master.server import Master  # only here: the other commands never pay for the master's imports
    master = Master(config, args.state)
    try:
        return master.control.answer(b"", messages.Control(op, fields))[0]
    finally:
        master.close()


def _control_verb(args: argparse.Namespace, op: str, done: str, **fields: Any) -> int:
    """One control op on the running master; prints what happened, or raises why not."""
    reply = control(endpoint(args), op, keys=client_keys(args), **fields)
    what = args.sweep if args.task is None else f"{args.sweep} task {args.task}"
    if not reply.get("ok"):
        raise refused(reply, args.sweep, args.task)
    print(f"{what}: {done}")
    return 0


class _open_store:
    """Read-only access to a state dir's store (works whether or not the master runs)."""

    def __init__(self, state_dir: Path):
        path = state_dir / "state.db"
        if not path.exists():
            raise ConfigError(f"{state_dir}: no ticketfarm state here (no state.db): pass --state DIR of the "
                              "master's state dir (a local run keeps it beside the spec)")
        self.store = Store(path, readonly=True)

    def __enter__(self) -> Store:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


if __name__ == "__main__":
    sys.exit(main())
