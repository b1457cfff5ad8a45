"""Rendering for the service commands: rich tables for people, plain JSON for scripts.

Kept apart from the commands so the console (and anything else that prints services) shows
the same columns, and so ``--json`` output never passes through rich (no wrapping, no colour).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

STATUS_STYLE = {
    "Running": "green",
    "Creating": "yellow",
    "Updating": "yellow",
    "Starting": "yellow",
    "Stopping": "yellow",
    "Deleting": "yellow",
    "Pending": "yellow",
    "Stopped": "dim",
    "Failed": "red",
}


def console(err: bool = False) -> Console:
    """A console on stdout/stderr; 160 columns when not a terminal so pipes don't wrap."""
    stream = sys.stderr if err else sys.stdout
    width = None if stream.isatty() else 160
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def local_time(value: str | None) -> str:
    """ISO-8601 UTC from the API → local ``YYYY-MM-DD HH:MM:SS`` ('' when absent)."""
    if not value:
        return ""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _e(value: Any) -> str:
    """User data as literal text: a reason like "[Errno 111]" must not be read as rich markup."""
    return escape(str(value))


def _status(status: str) -> str:
    style = STATUS_STYLE.get(status.split(" ", 1)[0])
    return f"[{style}]{_e(status)}[/{style}]" if style else _e(status)


def _instances(view: dict[str, Any]) -> str:
    counts = view.get("instances", {})
    return f"{counts.get('ready', 0)}/{counts.get('desired', 0)}"


def services_table(services: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "STATUS", "INSTANCES", "PROCESSOR", "CPU", "GPU", "MEMORY", "VERSION", "UPDATED"):
        table.add_column(column)
    for view in services:
        spec = view.get("spec", {})
        meta = spec.get("metadata", {})
        table.add_row(
            _e(view["name"]),
            _status(view.get("status", "")),
            _instances(view),
            _e(spec.get("processor") or "custom"),
            _e(meta.get("cpu", "")),
            _e(meta.get("gpu", "")),
            _e(f"{meta.get('memory', '')}M"),
            _e(view.get("version", "")),
            local_time(view.get("updated")),
        )
    return table


def service_table(view: dict[str, Any]) -> Table:
    """``desc``: one service as field/value rows (eascmd desc's fields)."""
    spec = view.get("spec", {})
    meta = spec.get("metadata", {})
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    counts = view.get("instances", {})
    rows = [
        ("Name", view["name"]),
        ("Status", _status(view.get("status", ""))),
        ("Desired", view.get("desired", "")),
        ("Message", view.get("message") or ""),
        ("Endpoint", view.get("endpoint") or "(no gateway)"),
        ("Token", spec.get("token", "")),
        ("Processor", spec.get("processor") or "custom (containers)"),
        (
            "Instances",
            f"{counts.get('ready', 0)} ready / {counts.get('total', 0)} running / "
            f"{counts.get('desired', 0)} desired",
        ),
        ("CPU", str(meta.get("cpu", ""))),
        ("GPU", str(meta.get("gpu", ""))),
        ("Memory", f"{meta.get('memory', '')} MB"),
        ("Resource", meta.get("resource") or "default"),
        ("Version", f"{view.get('version', '')} (latest {view.get('latest_version', '')})"),
        ("Created", local_time(view.get("created"))),
        ("Updated", local_time(view.get("updated"))),
    ]
    if spec.get("model_path"):
        rows.insert(7, ("Model path", spec["model_path"]))
    for key, value in rows:
        table.add_row(key, value if key == "Status" else _e(value))
    return table


def instances_table(instances: list[dict[str, Any]]) -> Table:
    """``w``: name, address, started, restarts, status, ready, reason."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("INSTANCE", "ADDRESS", "VERSION", "STARTED", "RESTARTS", "STATUS", "READY", "REASON"):
        table.add_column(column)
    for inst in instances:
        address = f"{inst.get('address', '')}:{inst.get('port', '')}" if inst.get("port") else ""
        status = inst.get("status", "")
        if inst.get("desired") == "deleted":
            status = f"{status} (deleting)"
        table.add_row(
            _e(inst["id"]),
            _e(address),
            _e(inst.get("version", "")),
            local_time(inst.get("started")),
            _e(inst.get("restarts", 0)),
            _status(status),
            "yes" if inst.get("ready") else "no",
            _e(inst.get("reason") or ""),
        )
    return table


def versions_table(versions: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("VERSION", "CURRENT", "CREATED", "PROCESSOR", "MODEL / PARAMS"):
        table.add_column(column)
    for version in versions:
        spec = version.get("spec", {})
        what = spec.get("model_path") or " ".join(spec.get("processor_params", [])) or ""
        if not what and spec.get("containers"):
            first = spec["containers"][0]
            what = first.get("image") or first.get("command") or "(script)"
        table.add_row(
            _e(version["version"]),
            "*" if version.get("current") else "",
            local_time(version.get("created")),
            _e(spec.get("processor") or "custom"),
            _e(what),
        )
    return table


def events_table(events: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("TIME", "KIND", "MESSAGE"):
        table.add_column(column)
    for event in events:
        table.add_row(local_time(event.get("time")), _e(event.get("kind", "")), _e(event.get("message", "")))
    return table
