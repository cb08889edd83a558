"""Clone the upstream repositories of ``requirements.csv`` at their pinned commits.

    python -m audio_models.scripts.setup_audio_repos [--only KEY ...] [--update]
    python -m audio_models.scripts.setup_audio_repos --list
    python -m audio_models.scripts.setup_audio_repos --editable whisperx

Checkouts go to ``external/audio/<repo-name>``; an override variable (``FAIRSEQ_REPO``, …)
that is set wins and nothing is cloned for it. Exit code 1 when any repository failed.
"""

from __future__ import annotations

import argparse
import sys

from audio_models.utils.repos import (
    RepoError,
    import_origin,
    inspect,
    install_editable,
    read_requirements,
    setup_repo,
)


def _list(rows) -> int:
    for up in rows:
        try:
            state = inspect(up)
        except RepoError as exc:
            print(f"{up.key}: error: {exc}")
            continue
        print(
            f"{up.key}: path={state.path or '-'} source={state.source} pinned={up.commit} "
            f"actual={state.commit or '-'} dirty={str(state.dirty).lower()} "
            f"import={import_origin(up)}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="KEY", help="set up only these keys")
    parser.add_argument(
        "--update", action="store_true", help="move clean checkouts to changed pins"
    )
    parser.add_argument(
        "--editable", nargs="+", metavar="KEY", help="pip install -e these checkouts"
    )
    parser.add_argument("--list", action="store_true", help="print each upstream's state")
    args = parser.parse_args(argv)
    try:
        rows = read_requirements()
    except RepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keys = {r.key for r in rows}
    wanted = args.only or args.editable or sorted(keys)
    unknown = sorted(set(wanted) - keys)
    if unknown:
        print(
            f"error: unknown keys {unknown}; requirements.csv has {sorted(keys)}", file=sys.stderr
        )
        return 2
    selected = [r for r in rows if r.key in wanted]
    if args.list:
        return _list(selected)
    failed = 0
    for up in selected:
        print(f"[{up.key}] {up.repository} @ {up.commit[:12]} ...", flush=True)
        result = install_editable(up) if args.editable else setup_repo(up, update=args.update)
        print(f"[{up.key}] {'ok' if result.ok else 'FAILED'}: {result.message}", flush=True)
        failed += not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
