"""Shell completion scripts for bash, zsh and fish, written from the CLI's own parsers.

What each option takes comes from the parser (``choices``, the tool presets,
paths), so a new option completes without an edit here. A lease id completes
from ``scratchd ls``: the ids of the leases the caller can see, on the daemon
the environment names; a cache id (``caches rm``) from ``scratchd caches``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

FILE, DIRECTORY, LEASE, CACHE, COMMAND = "file", "directory", "lease", "cache", "command"
Values = str | tuple[str, ...] | None  # a kind above, the words to offer, or None: anything


class Option(NamedTuple):
    flags: tuple[str, ...]
    help: str
    takes_value: bool
    values: Values
    repeatable: bool


class Command(NamedTuple):
    name: str
    help: str
    options: list[Option]
    # (name, what completes it): a subcommand's words (``caches rm``), then its own arguments
    positionals: list[tuple[str, Values]]


def script(
    shell: str, top: argparse.ArgumentParser, commands: Sequence[tuple[str, str, argparse.ArgumentParser]]
) -> str:
    """``top`` is the CLI's parser; ``commands`` each command's name, help and parser, in the CLI's order."""
    described = [Command(name, help, *_options(parser)) for name, help, parser in commands]
    return {"bash": bash, "zsh": zsh, "fish": fish}[shell](_options(top)[0], described)


# -- what the parsers say ---------------------------------------------------------


def _values(action: argparse.Action) -> Values:
    if action.choices:
        return tuple(action.choices)
    if action.dest == "tool":
        from scratchd.presets import PRESETS

        return tuple(PRESETS)
    kinds = {
        "socket": FILE,
        "config": FILE,
        "near": DIRECTORY,
        "id": LEASE,
        "cache_ids": CACHE,
        "cmd": COMMAND,
    }
    return kinds.get(action.dest)


def _help(action: argparse.Action) -> str:
    """The option's help, to its first parenthesis: a line, not a paragraph."""
    text = (action.help or "").replace("%(default)s", str(action.default))
    return text.split(" (")[0].split(": ")[0].strip()


def _options(parser: argparse.ArgumentParser) -> tuple[list[Option], list[tuple[str, Values]]]:
    options, positionals = [], []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or action.dest == "command":
            continue
        if action.option_strings:
            repeatable = isinstance(action, argparse._AppendAction)
            options.append(
                Option(
                    tuple(action.option_strings),
                    _help(action),
                    action.nargs != 0,
                    _values(action),
                    repeatable,
                )
            )
        else:
            positionals.append((action.dest, _values(action)))
            if isinstance(action, argparse._SubParsersAction):
                positionals += [p for sub in {*action.choices.values()} for p in _options(sub)[1]]
    return options, positionals


LEASE_IDS = "scratchd ls 2>/dev/null | awk 'NR > 1 {print $1}'"
CACHE_IDS = "scratchd caches 2>/dev/null | awk 'NR > 1 {print $1}'"


# -- bash -----------------------------------------------------------------------------


def bash(top: list[Option], commands: list[Command]) -> str:
    value_options = " ".join(flag for option in top if option.takes_value for flag in option.flags)
    arms = [_bash_arm("", top, [("command", tuple(c.name for c in commands))])]
    arms += [_bash_arm(command.name, command.options, command.positionals) for command in commands]
    return f"""\
# bash completion for scratchd: source <(scratchd completion bash)
_scratchd() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local i command=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            {value_options.replace(" ", "|")}) ((i++)) ;;
            -*) ;;
            *) command=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    if [[ $command == run ]]; then
        local j
        for ((j = i + 1; j < COMP_CWORD; j++)); do
            if [[ ${{COMP_WORDS[j]}} == -- ]]; then  # the command's own words
                if ((j + 1 == COMP_CWORD)); then
                    COMPREPLY=($(compgen -c -- "$cur"))
                else
                    compopt -o default 2>/dev/null; COMPREPLY=()
                fi
                return
            fi
        done
    fi
    case $command in
{"".join(arms)}    esac
}}
complete -F _scratchd scratchd
"""


def _bash_words(values: Values) -> str:
    if values == FILE:
        return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"))'
    if values == DIRECTORY:
        return 'compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur"))'
    if values == LEASE:
        return f'COMPREPLY=($(compgen -W "$({LEASE_IDS})" -- "$cur"))'
    if values == CACHE:
        return f'COMPREPLY=($(compgen -W "$({CACHE_IDS})" -- "$cur"))'
    if values == COMMAND:
        return 'COMPREPLY=($(compgen -c -- "$cur"))'
    if isinstance(values, tuple):
        return f'COMPREPLY=($(compgen -W "{" ".join(values)}" -- "$cur"))'
    return "COMPREPLY=()"


def _bash_arm(name: str, options: list[Option], positionals: list[tuple[str, Values]]) -> str:
    by_words: dict[str, list[str]] = {}  # options whose values complete alike share an arm
    for option in options:
        if option.takes_value:
            by_words.setdefault(_bash_words(option.values), []).extend(option.flags)
    cases = "".join(
        f"                {'|'.join(flags)}) {words}; return ;;\n" for words, flags in by_words.items()
    )
    flags = " ".join(flag for option in options for flag in option.flags)
    positional = _bash_words(positionals[0][1]) if positionals else "COMPREPLY=()"
    subcommand = ""
    if len(positionals) > 1:  # a subcommand's word typed already: complete its argument
        typed = '" ${COMP_WORDS[*]:i+1:COMP_CWORD-i-1} "'
        seen = " || ".join(f'{typed} == *" {word} "*' for word in positionals[0][1] or ())
        subcommand = f"            elif [[ {seen} ]]; then {_bash_words(positionals[1][1])}\n"
    return (
        f"        {name!r})\n"
        f"            case $prev in\n{cases}            esac\n"
        f'            if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "{flags}" -- "$cur"))\n'
        f"{subcommand}"
        f"            else {positional}; fi ;;\n"
    )


# -- zsh ------------------------------------------------------------------------------


def zsh(top: list[Option], commands: list[Command]) -> str:
    described = "\n".join(f"        {_zsh_quote(f'{c.name}:{c.help}')}" for c in commands)
    arms = "".join(
        f"                {command.name}) _arguments -S \\\n{_zsh_specs(command, '                    ')} ;;\n"
        for command in commands
    )
    top_specs = "".join(f"        {spec} \\\n" for option in top for spec in _zsh_option(option))
    return f"""\
#compdef scratchd
# zsh completion for scratchd: source <(scratchd completion zsh), or save it as _scratchd in $fpath
_scratchd() {{
    local curcontext=$curcontext state line
    typeset -A opt_args
    _arguments -C \\
{top_specs}        '1:command:->command' \\
        '*::argument:->argument' && return
    case $state in
        command)
            local -a commands=(
{described}
            )
            _describe -t commands 'scratchd command' commands ;;
        argument)
            curcontext=${{curcontext%:*:*}}:scratchd-$words[1]:
            case $words[1] in
{arms}            esac ;;
    esac
}}

_scratchd_leases() {{
    local -a ids
    ids=(${{(f)"$({LEASE_IDS})"}})
    compadd -a ids
}}

_scratchd_caches() {{
    local -a ids
    ids=(${{(f)"$({CACHE_IDS})"}})
    compadd -a ids
}}

if [[ $funcstack[1] == _scratchd ]]; then
    _scratchd "$@"
else
    compdef _scratchd scratchd
fi
"""


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_action(values: Values) -> str:
    if values == FILE:
        return "_files"
    if values == DIRECTORY:
        return "_files -/"
    if values == LEASE:
        return "_scratchd_leases"
    if values == CACHE:
        return "_scratchd_caches"
    if values == COMMAND:
        return "_normal"
    if isinstance(values, tuple):
        return f"({' '.join(values)})"
    return " "


def _zsh_option(option: Option) -> list[str]:
    help = option.help.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")
    value = f":{option.flags[-1].lstrip('-')}:{_zsh_action(option.values)}" if option.takes_value else ""
    exclusive = f"({' '.join(option.flags)})" if len(option.flags) > 1 and not option.repeatable else ""
    return [
        _zsh_quote(
            f"{exclusive}{'*' if option.repeatable else ''}{flag}{'=' if option.takes_value else ''}"
            f"[{help}]{value}"
        )
        for flag in option.flags
    ]


def _zsh_specs(command: Command, indent: str) -> str:
    specs = [spec for option in command.options for spec in _zsh_option(option)]
    for position, (name, values) in enumerate(command.positionals, 1):
        if values == COMMAND:  # run: everything after the options is the command line
            specs.append(_zsh_quote(f"*::{name}:_normal"))
        elif position > 1:  # a subcommand's arguments, as many as given
            specs.append(_zsh_quote(f"*:{name}:{_zsh_action(values)}"))
        else:
            specs.append(_zsh_quote(f"{position}:{name}:{_zsh_action(values)}"))
    return " \\\n".join(f"{indent}{spec}" for spec in specs)


# -- fish -----------------------------------------------------------------------------


def fish(top: list[Option], commands: list[Command]) -> str:
    skipped = " ".join(flag for option in top if option.takes_value for flag in option.flags)
    lines = [
        "# fish completion for scratchd: scratchd completion fish | source",
        "function __scratchd_command  # the command word, past the options before it and their values",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    while set -q words[1]",
        "        switch $words[1]",
        f"            case {skipped}",
        "                set -e words[1]",
        "            case '-*'",
        "            case '*'",
        "                echo $words[1]",
        "                return 0",
        "        end",
        "        set -e words[1]",
        "    end",
        "    return 1",
        "end",
        "function __scratchd_command_is",
        '    set -l command (__scratchd_command); and test "$command" = $argv[1]',
        "end",
        "complete -c scratchd -f",
        *(_fish_option("'not __scratchd_command'", option) for option in top),
        *(
            f"complete -c scratchd -n 'not __scratchd_command' -a {c.name} -d {_fish_quote(c.help)}"
            for c in commands
        ),
    ]
    for command in commands:
        chosen = f"'__scratchd_command_is {command.name}'"
        lines += [_fish_option(chosen, option) for option in command.options]
        for _, values in command.positionals[:1]:
            if values == COMMAND:  # after `--`: a command line of its own
                lines += [
                    "function __scratchd_command_line",
                    "    set -l words (commandline -opc)",
                    "    set -l start (contains -i -- -- $words)",
                    "    __fish_complete_subcommand --commandline $words[(math $start + 1)..-1] (commandline -ct)",
                    "end",
                    f"complete -c scratchd -n '__scratchd_command_is {command.name};"
                    " and contains -- -- (commandline -opc)' -x -a '(__scratchd_command_line)'",
                ]
            elif len(command.positionals) > 1:  # a subcommand's word, then its arguments
                seen = f"__fish_seen_subcommand_from {' '.join(values or ())}"
                words, arguments = _fish_values(values), _fish_values(command.positionals[1][1])
                lines.append(
                    f"complete -c scratchd -n '__scratchd_command_is {command.name}; and not {seen}' {words}"
                )
                lines.append(
                    f"complete -c scratchd -n '__scratchd_command_is {command.name}; and {seen}' {arguments}"
                )
            elif values is not None:
                lines.append(f"complete -c scratchd -n {chosen} {_fish_values(values)}")
    return "\n".join(lines) + "\n"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_values(values: Values) -> str:
    if values == FILE:
        return "-r -F"
    if values == DIRECTORY:
        return "-x -a '(__fish_complete_directories)'"
    if values == LEASE:
        return f"-x -a {_fish_quote(f'({LEASE_IDS})')}"
    if values == CACHE:
        return f"-x -a {_fish_quote(f'({CACHE_IDS})')}"
    if isinstance(values, tuple):
        return f"-x -a {_fish_quote(' '.join(values))}"
    return "-x"


def _fish_option(condition: str, option: Option) -> str:
    flags = " ".join(f"-l {flag[2:]}" if flag.startswith("--") else f"-s {flag[1:]}" for flag in option.flags)
    value = f" {_fish_values(option.values)}" if option.takes_value else ""
    return f"complete -c scratchd -n {condition} {flags}{value} -d {_fish_quote(option.help)}"
