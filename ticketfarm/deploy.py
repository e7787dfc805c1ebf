"""Rolling ticketfarm out with Ansible: the wheelhouse build and the `ticketfarm deploy` command."""

# The playbooks run it from the checkout (`python -m ticketfarm.deploy wheelhouse ...`, cwd the
# checkout), so the checkout's own code builds the wheelhouse whatever is installed.

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from pathlib import Path

from ticketfarm.errors import DeployError

#: `--action` -> playbook under playbooks/
PLAYBOOKS = {
    "install": "slaves.yml",
    "stop": "slaves-stop.yml",
    "start": "slaves-start.yml",
    "restart": "slaves-restart.yml",
    "remove": "slaves-remove.yml",
}
#: actions whose playbook copies the wheelhouse to the hosts
NEEDS_WHEELHOUSE = {"install", "restart"}
#: one tar of all wheels inside the wheelhouse: the playbooks copy this single
#: file (one checksum round trip per host instead of one per wheel)
BUNDLE = "wheels.tar"
#: file in the wheelhouse holding source_digest() of the last build
SOURCE_STAMP = "source.sha256"
#: files inside the package dirs that are never part of a build
_JUNK = ("__pycache__", ".pyc")
#: fixed wheel timestamps, so rebuilding unchanged source gives equal wheels
SOURCE_DATE_EPOCH = "315532800"


def find_source(start: Path | None = None) -> Path:
    """The ticketfarm checkout to deploy: the nearest dir with pyproject.toml and playbooks/."""
    candidates = []
    if start is not None:
        candidates.append(Path(start).resolve())
    candidates += [Path.cwd().resolve(), Path(__file__).resolve().parent.parent]
    for base in candidates:
        for d in (base, *base.parents):
            if (d / "pyproject.toml").is_file() and (d / "playbooks").is_dir():
                return d
    raise DeployError("no ticketfarm checkout (pyproject.toml + playbooks/) found; "
                      "run from the checkout or pass --source")


def wheel_digest(path: Path) -> str:
    """Hash of a wheel's member names and contents, ignoring zip timestamps and order."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            h.update(name.encode() + b"\0")
            h.update(hashlib.sha256(zf.read(name)).digest())
    return h.hexdigest()


def _pip_wheel(python: str, args: list[str], quiet: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH, PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [python, "-m", "pip", "wheel", *(["-q"] if quiet else []), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def build_wheelhouse(source: Path, dest: Path, python: str = sys.executable,
                     quiet: bool = True) -> bool:
    """Build ticketfarm and all its dependencies as wheels into `dest`.

    Equivalent to `pip wheel SOURCE -w DEST`, but a wheel already in `dest`
    with the same contents is left untouched, and stale *.whl files are
    deleted, so the playbooks see a change only when the code changed.
    `dest/wheels.tar` bundles the wheels byte-for-byte reproducibly.  When
    the checkout's files hash as at the last build, nothing is rebuilt.
    Dependencies come from `dest` itself when they are all there (no network),
    else from the package index.  Returns True when `dest` was changed.
    """
    source, dest = Path(source).resolve(), Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / SOURCE_STAMP
    digest = source_digest(source)
    if (stamp.exists() and stamp.read_text().strip() == digest
            and (dest / BUNDLE).exists()):
        return False                  # same source as the last build: nothing to do
    with tempfile.TemporaryDirectory(prefix="ticketfarm-wheels-") as tmp:
        # build from a copy of the package's own files: setuptools' build/ dir in the checkout would
        # keep modules deleted since the last build, and state dirs (keys!) or results have no place in it
        src = Path(tmp) / "src"
        for rel in package_files(source):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, src / rel)
        tmp = str(Path(tmp) / "wheels")
        own = _pip_wheel(python, ["--no-deps", "-w", tmp, str(src)], quiet)
        if own.returncode != 0:
            raise DeployError(f"building the ticketfarm wheel failed:\n{own.stdout}{own.stderr}")
        (wheel,) = Path(tmp).glob("*.whl")
        deps = _pip_wheel(python, ["--no-index", "--find-links", str(dest), "-w", tmp,
                                   str(wheel)], quiet)
        if deps.returncode != 0:
            deps = _pip_wheel(python, ["--find-links", str(dest), "-w", tmp, str(wheel)], quiet)
        if deps.returncode != 0:
            raise DeployError(f"fetching dependency wheels failed:\n{deps.stdout}{deps.stderr}")
        changed = _sync_wheels(Path(tmp), dest)
    changed = _write_bundle(dest) or changed
    stamp.write_text(digest + "\n")
    return changed


def package_files(source: Path) -> list[Path]:
    """What a build needs from the checkout, relative to it: pyproject.toml, the files it names
    (readme, license) and the files of the packages of [tool.setuptools] packages; nothing else."""
    try:
        project = tomllib.loads((source / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DeployError(f"{source / 'pyproject.toml'}: {exc}") from None
    packages = project.get("tool", {}).get("setuptools", {}).get("packages")
    if not isinstance(packages, list) or not packages:
        raise DeployError(f"{source / 'pyproject.toml'}: [tool.setuptools] packages must list the packages "
                          "(the wheelhouse is built from their files only)")
    named = [project.get("project", {}).get(k) for k in ("readme", "license")]
    missing = [name for name in _packages_in(source, packages) if name not in packages]
    if missing:
        raise DeployError(f"{source / 'pyproject.toml'}: {', '.join(missing)} not in [tool.setuptools] packages: "
                          "the wheel would leave them out and the slaves could not import them; add them")
    files = {Path("pyproject.toml"), *(Path(n) for n in named if isinstance(n, str))}
    for top in sorted({p.split(".")[0] for p in packages}):
        for path in (source / top).rglob("*"):
            if path.is_file() and not any(part == _JUNK[0] for part in path.parts) and path.suffix != _JUNK[1]:
                files.add(path.relative_to(source))
    return sorted(files)


def _packages_in(source: Path, packages: list[str]) -> list[str]:
    """Dotted names of every package (a dir with __init__.py) under the top-level packages listed."""
    found = set()
    for top in {p.split(".")[0] for p in packages}:
        for init in (source / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(source).parts))
    return sorted(found)


def source_digest(source: Path) -> str:
    """Hash of the files a build copies from the checkout (paths and contents)."""
    h = hashlib.sha256()
    for rel in package_files(source):
        h.update(str(rel).encode() + b"\0")
        h.update(hashlib.sha256((source / rel).read_bytes()).digest())
    return h.hexdigest()


def _write_bundle(dest: Path) -> bool:
    """(Re)write dest/wheels.tar from dest/*.whl; sorted, zero mtimes, so equal wheels give equal bytes."""
    tmp = dest / (BUNDLE + ".new")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for whl in sorted(dest.glob("*.whl")):
            info = tarfile.TarInfo(whl.name)
            info.size, info.mode, info.mtime = whl.stat().st_size, 0o644, 0
            with whl.open("rb") as f:
                tar.addfile(info, f)
    bundle = dest / BUNDLE
    if bundle.exists() and bundle.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return False
    tmp.replace(bundle)
    return True


def _sync_wheels(built: Path, dest: Path) -> bool:
    """Make dest/*.whl equal to built/*.whl, comparing wheels by content."""
    changed = False
    new = {p.name: p for p in built.glob("*.whl")}
    for old in dest.glob("*.whl"):
        if old.name not in new:
            old.unlink()
            changed = True
    for name, path in sorted(new.items()):
        target = dest / name
        if target.exists() and wheel_digest(target) == wheel_digest(path):
            continue
        shutil.copyfile(path, target)
        changed = True
    return changed


def playbook_command(source: Path, inventory: str, action: str, *, check: bool = False,
                     wheelhouse: Path | None = None, limit: str | None = None,
                     extra: list[str] | None = None, keys_state: Path | None = None) -> list[str]:
    """The ansible-playbook command line for one `ticketfarm deploy` action."""
    cmd = ["ansible-playbook", "-i", inventory, str(source / "playbooks" / PLAYBOOKS[action])]
    if wheelhouse is not None:
        cmd += ["-e", f"ticketfarm_wheelhouse={wheelhouse}", "-e", "ticketfarm_build_wheelhouse=false"]
    if keys_state is not None:  # the controller's keys dir (--state); -e below may override
        cmd += ["-e", f"ticketfarm_keys_state={keys_state}"]
    if check:
        cmd += ["--check", "--diff"]
    if limit:
        cmd += ["--limit", limit]
    for e in extra or []:
        cmd += ["-e", e]
    return cmd


def chosen_state(args: argparse.Namespace) -> Path | None:
    """`ticketfarm --state DIR deploy` (or $TICKETFARM_STATE): the keys dir; None when neither was given.

    The CLI's bare default (./.ticketfarm of wherever deploy runs) is never passed: in a directory that is
    no master's state dir it would stand for new keys, and the inventory's ticketfarm_keys_state is meant.
    """
    state = getattr(args, "state", None)
    if state is None or (Path(state) == Path(".ticketfarm") and not os.environ.get("TICKETFARM_STATE")):
        return None
    return Path(state).resolve()


def deploy(args: argparse.Namespace) -> int:
    """`ticketfarm deploy`: build the wheelhouse if needed, then run the action's playbook."""
    try:
        source = find_source(args.source)
        wheelhouse = None
        if args.action in NEEDS_WHEELHOUSE:
            wheelhouse = Path(args.wheelhouse or source / "wheelhouse").resolve()
            if args.check and any(wheelhouse.glob("ticketfarm-*.whl")):
                print(f"deploy: --check: using the existing wheelhouse {wheelhouse}", flush=True)
            else:
                print(f"deploy: building wheelhouse {wheelhouse} from {source}", flush=True)
                changed = build_wheelhouse(source, wheelhouse)
                print(f"deploy: wheelhouse {'changed' if changed else 'unchanged'}", flush=True)
    except DeployError as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    if shutil.which("ansible-playbook") is None:
        print("deploy: ansible-playbook not found; pip install 'ticketfarm[deploy]' "
              "(or ansible-core)", file=sys.stderr)
        return 1
    cmd = playbook_command(source, args.inventory, args.action, check=args.check,
                           wheelhouse=wheelhouse, limit=args.limit, extra=args.extra_vars,
                           keys_state=chosen_state(args))
    print("deploy: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=source).returncode


def add_deploy_parser(subparsers) -> argparse.ArgumentParser:
    """Register `ticketfarm deploy` on an argparse subparsers object; sets func(args) -> int."""
    p = subparsers.add_parser(
        "deploy", help="install/stop/start/restart/remove slaves on an Ansible inventory",
        description="Wraps ansible-playbook over playbooks/ of this checkout; "
                    "see docs/DEPLOY.md.")
    p.add_argument("-i", "--inventory", required=True, help="Ansible inventory (see inventory.example)")
    p.add_argument("--action", choices=sorted(PLAYBOOKS), default="install",
                   help="install (default; also upgrades), stop, start, "
                        "restart (rolling upgrade), remove")
    p.add_argument("--check", action="store_true", help="dry run: report what would change")
    p.add_argument("--limit", help="only these hosts/groups (ansible-playbook --limit)")
    p.add_argument("-e", "--extra-vars", action="append", default=[], metavar="VAR=VALUE",
                   help="extra Ansible variable, repeatable")
    p.add_argument("--wheelhouse", help="wheel directory to build and copy (default: SOURCE/wheelhouse)")
    p.add_argument("--source", help="ticketfarm checkout to deploy (default: found from cwd)")
    p.set_defaults(func=deploy)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python ticketfarm/deploy.py wheelhouse|deploy ...`, used by the playbooks and without the CLI."""
    parser = argparse.ArgumentParser(prog="deploy.py")
    sub = parser.add_subparsers(dest="command", required=True)
    wh = sub.add_parser("wheelhouse", help="build the wheelhouse; prints 'changed' or 'unchanged'")
    wh.add_argument("--source", required=True)
    wh.add_argument("--dest", required=True)
    add_deploy_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "wheelhouse":
        try:
            changed = build_wheelhouse(Path(args.source), Path(args.dest))
        except DeployError as exc:
            print(f"deploy: {exc}", file=sys.stderr)
            return 1
        print("changed" if changed else "unchanged")
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
