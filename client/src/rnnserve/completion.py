"""Shell completion for ``rnnserve``: commands, flags, flag choices and session ids.

``rnnserve completion bash`` prints a bash function that asks ``rnnserve __complete CWORD
WORD...`` for the candidates; the answer is computed from the CLI's own argparse parser, so
it is never out of date, and session ids come from the server (ListSessions, 2 s deadline;
nothing if it doesn't answer). An empty answer lets bash complete file names.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Sequence

from rnnserve.client import DEFAULT_ADDRESS, Client
from rnnserve.errors import RnnServeError

BASH_SCRIPT = """\
# bash completion for rnnserve: eval "$(rnnserve completion bash)" (e.g. in ~/.bashrc)
_rnnserve_complete() {
    local IFS=$'\\n'
    COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" __complete "$COMP_CWORD" \
        "${COMP_WORDS[@]}" 2>/dev/null)" -- "${COMP_WORDS[COMP_CWORD]}"))
}
complete -o default -o nosort -F _rnnserve_complete rnnserve
"""

# Positionals whose values are session ids.
ID_DESTS = {"id", "ids"}
# Options of the connection group, needed to ask the server for ids.
CONNECTION = ("--address", "--token", "--ca-file", "--tls")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        flag: action
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for flag in action.option_strings
    }


def _session_ids(options: dict[str, str]) -> list[str]:
    address = options.get("--address") or os.environ.get("RNNSERVE_ADDRESS") or DEFAULT_ADDRESS
    try:
        with Client(
            address,
            timeout=2.0,
            token=options.get("--token"),
            ca_file=options.get("--ca-file") or os.environ.get("RNNSERVE_CA_FILE") or None,
            tls="--tls" in options,
        ) as client:
            return [s.session_id for s in itertools.islice(client.list_sessions(), 10_000)]
    except RnnServeError:
        return []


def complete(parser: argparse.ArgumentParser, words: Sequence[str], cword: int) -> list[str]:
    """Candidates for ``words[cword]`` (``words[0]`` is the program), unfiltered by prefix."""
    words = list(words[: cword + 1]) + ([""] if cword >= len(words) else [])
    current = words[cword]
    commands = _subcommands(parser)
    command: argparse.ArgumentParser | None = None
    given: dict[str, str] = {}
    positionals = 0
    i = 1
    while i < cword:
        word = words[i]
        active = command or parser
        action = _options(active).get(word.split("=", 1)[0])
        if action is not None:
            if action.nargs == 0 or "=" in word:
                given[word.split("=", 1)[0]] = word.split("=", 1)[-1] if "=" in word else ""
            elif i + 1 < cword:
                given[word] = words[i + 1]
                i += 1
            else:  # the current word is this option's value
                return list(action.choices) if action.choices else []
        elif command is None and word in commands:
            command = commands[word]
        elif command is not None and not word.startswith("-"):
            positionals += 1
        i += 1
    active = command or parser
    if current.startswith("-"):
        return sorted(_options(active))
    if command is None:
        return sorted(commands)
    wanted = [a for a in command._actions if not a.option_strings and a.help != argparse.SUPPRESS]
    if wanted:
        index = min(positionals, len(wanted) - 1)
        action = wanted[index]
        repeats = action.nargs in ("+", "*")
        if action.dest in ID_DESTS and (positionals == index or repeats):
            return _session_ids({k: v for k, v in given.items() if k in CONNECTION})
    return []
