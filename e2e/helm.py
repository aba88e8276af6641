#!/usr/bin/env python3
"""Helm without a helm binary: the Helm v4 engine of the PyPI package helm-python-sdk, for the tests and by hand.

    e2e/helm.py lint      CHART [-f VALUES.yaml]... [--values-json JSON]          -> lint report (JSON)
    e2e/helm.py render    CHART [--name N] [--namespace NS] [-f ...] [--values-json JSON]
                                                                                 -> {"manifests": {path: yaml}}
    e2e/helm.py values    CHART                                                  -> default values (JSON)
    e2e/helm.py crds      CHART                                                  -> [{"name", "filename", "data"}]
    e2e/helm.py install   CHART --name N --namespace NS [--kubeconfig F] [-f ...] [--values-json JSON] [--skip-crds]
    e2e/helm.py upgrade   CHART --name N --namespace NS [--kubeconfig F] [-f ...] [--values-json JSON]
    e2e/helm.py uninstall --name N --namespace NS [--kubeconfig F]
                                                       -> release summary (JSON, with the rendered "manifest")

Values merge like helm's: the chart's defaults, then each -f file in order, then --values-json (maps merge
recursively, anything else is replaced). Exit codes: 0 ok; 1 lint errors; 2 bad values (schema) or a failed
template (`fail`), message on stderr; 3 any other Helm error. Install: `python3 -m pip install helm-python-sdk==0.2.2`.

`install` applies the CRDs in the chart's crds/ (the Helm 4 engine: server-side, so the same content changes nothing;
`--skip-crds` leaves them alone); upgrade never changes them and uninstall never deletes them: uninstalling a release
keeps every BackgroundJob in the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

try:
    import helm_python as helm
except ImportError:  # pragma: no cover - a clear hint instead of a traceback
    sys.exit("e2e/helm.py: the Helm engine is missing: python3 -m pip install helm-python-sdk==0.2.2")


@contextlib.contextmanager
def quiet_go_notes() -> Iterator[None]:
    """The engine logs an INFO line to stderr for each symlink it follows (crds/ links to the repo's crds/)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if "found symbolic link in path" not in line:
                    print(line, file=sys.stderr)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def user_values(args: argparse.Namespace) -> dict[str, Any] | None:
    values: dict[str, Any] = {}
    given = False
    for path in args.values or []:
        with open(path, encoding="utf-8") as f:
            values = merge(values, helm.values_from_yaml(f.read()) or {})
        given = True
    if args.values_json:
        values = merge(values, json.loads(args.values_json))
        given = True
    return values if given else None


def emit(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def config(args: argparse.Namespace) -> helm.Config:
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    return helm.Config(kubeconfig_path=kubeconfig, namespace=args.namespace)


def run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "lint":
        report = helm.lint(args.chart, user_values(args), namespace=args.namespace)
        emit(report)
        failed = report.get("errors") or any(m.get("severity", 0) >= 3 for m in report.get("messages", []))
        return 1 if failed else 0
    if cmd in ("render", "values", "crds"):
        with helm.Chart.load(args.chart) as chart:
            if cmd == "values":
                emit(chart.values)
            elif cmd == "crds":
                emit(chart.crds)
            else:
                values = user_values(args)
                emit({"manifests": chart.render(values, name=args.name, namespace=args.namespace, is_install=True)})
        return 0
    with config(args) as cfg:
        if cmd == "install":
            release = cfg.install(args.chart, args.name, user_values(args), namespace=args.namespace, timeout=120)
        elif cmd == "upgrade":
            release = cfg.upgrade(args.chart, args.name, user_values(args), namespace=args.namespace, timeout=120)
        else:
            release = cfg.uninstall(args.name, timeout=120, ignore_not_found=True)
        emit(release)
    return 0


def install_skipping_crds(args: argparse.Namespace) -> int:
    """`helm install --skip-crds`: the Python binding does not expose the option, the engine does."""
    from helm_python import _native
    from helm_python.config import _opts

    with config(args) as cfg:
        values = user_values(args)
        payload = _native.call_string(
            "helm_install",
            cfg._raw(),
            _native.HANDLE(0),
            _native.HANDLE(0),
            os.fspath(args.chart),
            args.name,
            None if values is None else json.dumps(values),
            _opts(namespace=args.namespace, timeout_seconds=120, skip_crds=True),
        )
        emit(json.loads(payload))
    return 0


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `e2e/helm.py render ... | head` ends quietly
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["lint", "render", "values", "crds", "install", "upgrade", "uninstall"])
    p.add_argument("chart", nargs="?", help="chart directory (all commands but uninstall)")
    p.add_argument("--name", default="bgjobs", help="release name")
    p.add_argument("--namespace", default="default", help="release namespace")
    p.add_argument("-f", "--values", action="append", help="a values YAML file (repeatable)")
    p.add_argument("--values-json", help="values as one JSON object, merged last")
    p.add_argument("--kubeconfig", help="default: $KUBECONFIG, then ~/.kube/config")
    p.add_argument("--skip-crds", action="store_true", help="install: do not install the chart's CRDs")
    args = p.parse_args()
    if args.command != "uninstall" and not args.chart:
        p.error(f"{args.command} needs a CHART directory")
    try:
        with quiet_go_notes():
            if args.command == "install" and args.skip_crds:
                return install_skipping_crds(args)
            return run(args)
    except (helm.HelmValuesError, helm.HelmRenderError) as e:
        print(f"helm: {e}", file=sys.stderr)
        return 2
    except helm.HelmError as e:
        # An install or upgrade wraps schema and `fail` errors in a release error: still bad values.
        bad_values = "values don't meet the specifications" in str(e) or "execution error at" in str(e)
        print(f"helm: {e}" if bad_values else f"helm: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if bad_values else 3


if __name__ == "__main__":
    sys.exit(main())
