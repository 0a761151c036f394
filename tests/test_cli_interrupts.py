"""Ctrl-C is exit 130 and one line wherever it lands, even where a library
turns the KeyboardInterrupt into another exception (pydantic's serializer
does: PydanticSerializationError '... KeyboardInterrupt')."""

from __future__ import annotations

import argparse
import os
import signal

import pytest
from pydantic import BaseModel, field_serializer

from flows import cli


class _Settings(BaseModel):
    value: int = 1

    @field_serializer("value")
    def _slow(self, value: int) -> int:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while pydantic serialises
        return value


def _parser_running(handler) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denoise")
    parser.add_argument("--store")
    parser.add_argument("--debug", action="store_true")
    parser.set_defaults(handler=handler, command="models")
    return parser


def _main_running(monkeypatch, handler) -> int:
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_running(handler))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh process has
    try:
        return cli.main([])
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_pydantic_serializer_is_exit_130(monkeypatch, capsys):
    def handler(args):
        with pytest.raises(Exception) as caught:  # what the CLI would otherwise see
            _Settings().model_dump()
        raise caught.value

    code = _main_running(monkeypatch, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err == ["denoise: interrupted; finished files are kept, rerun to finish"]


def test_an_error_without_ctrl_c_is_still_an_error(monkeypatch, capsys):
    def handler(args):
        raise RuntimeError("boom")

    code = _main_running(monkeypatch, handler)
    assert code == 1
    assert "unexpected error: RuntimeError: boom" in capsys.readouterr().err


def test_ctrl_c_swallowed_by_a_library_still_ends_the_command_as_ctrl_c(monkeypatch, capsys):
    """A library that catches the KeyboardInterrupt (a logging handler, a
    serializer) must not turn the user's Ctrl-C into a success."""

    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass  # swallowed, as a library's catch-all would
        return 0

    code = _main_running(monkeypatch, handler)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err == ["denoise: interrupted; finished files are kept, rerun to finish"]
