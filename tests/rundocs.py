"""Run the shell blocks of README.md and docs/*.md that are marked runnable, as a reader would paste them.

A block is runnable when its fence reads ```` ```sh runnable ````. Each block runs with
``bash -euo pipefail`` in a fresh temporary directory (also its ``$HOME``), with the virtualenv's ``bin``
first on ``PATH`` -- what the README's set-up (``. .venv/bin/activate``) gives -- and in its own network
namespace (``unshare -n``, loopback up), so the fixed ports the docs use (8000, 8080, 9002, ...) never
collide with anything else on the machine.
Background processes the block starts (``&``) are killed with the block's process group when it ends or
times out.

    python tests/rundocs.py [FILE ...]        # default: README.md docs/*.md; exit status 1 if a block fails
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^```sh runnable\s*$")
TIMEOUT_S = 90.0


@dataclass(frozen=True, slots=True)
class Block:
    path: Path
    line: int
    """1-based line of the opening fence."""
    text: str

    @property
    def name(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def blocks(paths: list[Path]) -> list[Block]:
    """Every runnable block of ``paths``, in order."""
    out: list[Block] = []
    for path in paths:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if MARKER.match(lines[i]):
                start = i
                i += 1
                body: list[str] = []
                while i < len(lines) and lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                out.append(Block(path, start + 1, "\n".join(body) + "\n"))
            i += 1
    return out


def default_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _environment(home: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFEROUTE_", "PYTEST_"))}
    env.update(
        HOME=home,
        PATH=f"{venv_bin}:{env.get('PATH', '/usr/bin:/bin')}",
        VIRTUAL_ENV=str(Path(venv_bin).parent),
    )
    return env


def run(block: Block, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """Run one block; returns (exit status, combined output). -9 means it timed out."""
    for tool in ("unshare", "ip", "curl"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"rundocs needs {tool!r} (make test-deps installs it)")
    with tempfile.TemporaryDirectory(prefix="rundocs-") as tmp:
        script = Path(tmp) / "block.sh"
        script.write_text(block.text)
        log = Path(tmp) / "output.log"
        prologue = "ip link set lo up && exec bash -euo pipefail block.sh"
        with log.open("w") as out:  # a file, not a pipe: background servers keep their stdout open
            proc = subprocess.Popen(
                ["unshare", "--net", "--", "bash", "-c", prologue],
                cwd=tmp,
                env=_environment(tmp),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                status = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                status = -9
            finally:
                _kill_group(proc)
        output = log.read_text(errors="replace")
        if status == -9:
            output += f"\n[rundocs: timed out after {timeout:.0f} s]"
        return status, output


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the block's process group (its background servers), SIGKILL to what is left after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    proc.wait()


def main(argv: list[str]) -> int:
    files = [Path(a).resolve() for a in argv] or default_files()
    failed = 0
    for block in blocks(files):
        t0 = time.monotonic()
        status, output = run(block)
        print(
            f"{block.name}: {'ok' if status == 0 else f'FAILED ({status})'} in {time.monotonic() - t0:.1f} s"
        )
        if status != 0:
            failed += 1
            print(output)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
