"""Checks of command-line values shared by several subcommands, each failing with a
:class:`click.BadParameter` that names the flag (the ``inferoute`` command prints it as one line).

They run before anything starts (before a cluster is contacted, a port bound or a benchmark run), so a typo
costs nothing but the line that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import click

from inferoute.errors import InferouteError, read_text_file


def pem_certificates(path: str | None, flag: str) -> str | None:
    """``path`` if it is a readable UTF-8 file holding at least one PEM certificate."""
    if path is None:
        return None
    if Path(path).is_dir():
        raise click.BadParameter(f"{path} is a directory; give a PEM file", param_hint=f"'{flag}'")
    try:
        text = read_text_file(path, path)
    except InferouteError as exc:
        raise click.BadParameter(exc.message, param_hint=f"'{flag}'") from exc
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise click.BadParameter(
            f"{path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)", param_hint=f"'{flag}'"
        )
    return path


def writable_dir(path: Path | None, flag: str) -> Path | None:
    """``path``, created when missing, if files can be written into it."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise click.BadParameter(f"{path} exists and is not a directory", param_hint=f"'{flag}'")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create {path}: {exc.strerror or exc}", param_hint=f"'{flag}'"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{path}: no permission to write there", param_hint=f"'{flag}'")
    return path


def writable_file(path: Path | None, flag: str) -> Path | None:
    """``path`` if it is not a directory and its directory (created when missing) is writable."""
    if path is None:
        return None
    if path.is_dir():
        raise click.BadParameter(f"{path} is a directory; give a file name", param_hint=f"'{flag}'")
    writable_dir(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise click.BadParameter(f"{path}: no permission to write it", param_hint=f"'{flag}'")
    return path


def int_list(
    minimum: int = 1, example: str = "10,100"
) -> Callable[[click.Context, click.Parameter, str], list[int]]:
    """A click callback: comma-separated integers, each at least ``minimum`` (an empty string: none)."""

    def convert(_ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
        try:
            values = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            values = None
        if values is None or any(v < minimum for v in values):
            raise click.BadParameter(
                f"expected comma-separated integers >= {minimum} such as {example}, got {value!r}"
            )
        return values

    return convert


def choice_list(*valid: str) -> Callable[[click.Context, click.Parameter, str], str]:
    """A click callback: a comma list of ``valid`` names (an empty string: none)."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
        unknown = [v.strip() for v in value.split(",") if v.strip() and v.strip() not in valid]
        if unknown:
            raise click.BadParameter(f"unknown {unknown[0]!r}; valid: {', '.join(valid)} (comma-separated)")
        return value

    return check


def out_file(_ctx: click.Context, param: click.Parameter, value: str | Path | None) -> Path | None:
    """A click callback for a results file: writable (checked before a benchmark runs, not after)."""
    return None if value is None else writable_file(Path(value), _flag(param))


def out_dir(_ctx: click.Context, param: click.Parameter, value: str | Path | None) -> Path | None:
    """A click callback for a results directory: created and writable before a benchmark runs."""
    return None if value is None else writable_dir(Path(value), _flag(param))


__all__ = [
    "choice_list",
    "int_list",
    "out_dir",
    "out_file",
    "pem_certificates",
    "writable_dir",
    "writable_file",
]


def _flag(param: click.Parameter) -> str:
    return param.opts[0] if param.opts else f"--{param.name}"
