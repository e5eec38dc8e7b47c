"""``python -m testbed.bench``: a bad option is one line on stderr naming it, exit 2."""

from __future__ import annotations

import pytest

from testbed.bench.__main__ import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["traffic", "--nodes", "1"], "traffic: --nodes must be 2..250"),
        (["scaling", "--sizes", "ten"], "scaling: --sizes: expected numbers"),
        (["coap", "--repeat", "0"], "coap: --repeat 1..20"),
        (["all", "--only", "nosuch"], "all: unknown benchmark 'nosuch'"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"python -m testbed.bench {needle}"), captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
