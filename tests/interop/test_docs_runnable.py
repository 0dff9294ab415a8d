"""Every shell block of README.md and docs/*.md marked ```` ```sh runnable ```` runs as written (see
tests/rundocs.py: a fresh directory and $HOME, the virtualenv on PATH, its own network namespace, real
processes, a time limit, background processes killed at the end)."""

from __future__ import annotations

import pytest

import rundocs

BLOCKS = rundocs.blocks(rundocs.default_files())


def test_the_readme_and_the_docs_have_runnable_blocks() -> None:
    files = {b.path.name for b in BLOCKS}
    assert {"README.md", "envoy.md", "nginx.md"} <= files, files


@pytest.mark.timeout(rundocs.TIMEOUT_S + 30)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs_as_written(block: rundocs.Block) -> None:
    status, output = rundocs.run(block)
    assert status == 0, f"{block.name} exited with {status}:\n{block.text}\n--- output ---\n{output}"
