"""The ``scratchd`` command line (docs/cli.md): the standard library only.

``scratchd run`` starts on every CI job, so the module level imports only the
standard library, and not argparse: ``run``'s options, plainly spelled, are read
without it. argparse, the server (``serve``, installed with ``scratchd[server]``)
and whatever a single command needs are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace  # loaded already: enum, which re imports, uses it

from scratchd.client import KEEPS, Client, DaemonUnreachable, Renewer, ScratchdError, keeps
from scratchd.units import UnitError, format_duration, format_size, parse_duration, parse_size

TYPE_CHECKING = False  # `import typing` costs 4 ms, `collections.abc` 0.2 ms
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from typing import Any, NoReturn, TypedDict, Unpack

    from typing_extensions import TypeIs

    Handler = Callable[[SimpleNamespace, Client], int]
    LocalHandler = Callable[[SimpleNamespace], int]

    class OptionSpec(TypedDict, total=False):
        """The ``add_argument`` keywords the options here use."""

        metavar: str
        help: str
        type: Callable[[str], Any]
        choices: Sequence[str]
        action: str
        default: Any

    Option = tuple[tuple[str, ...], OptionSpec]  # add_argument's flags and keywords

# Exit codes; 2, a usage error, is argparse's own.
EXIT_OK = 0
EXIT_REFUSED = 1  # the daemon said no (and `serve` could not start)
EXIT_UNREACHABLE = 3
EXIT_LEASE_ENDED = 4  # the lease ended under `run`'s command
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away

FALLBACKS = ("fail", "local")
WATCH_SECONDS = 1.0  # how often `run` looks at its lease: it must notice an end within 2 s
KILL_AFTER_SECONDS = 10.0  # from SIGTERM to SIGKILL, for a command whose lease ended
FOLLOW_SECONDS = 1.0  # how often `events --follow` asks for more
EVENTS_PAGE = 1000  # the API's largest `limit`

PLACEMENTS = ("prefer-same-filesystem", "same-filesystem", "any")
LOG_LEVELS = ("debug", "info", "warning", "error")
SHELLS = ("bash", "zsh", "fish")


def main(argv: Sequence[str] | None = None) -> int:
    """The command's exit status; a closed pipe on stdout or stderr ends it quietly with 141.

    Output is flushed here, not at the interpreter's exit, where a reader gone
    (``scratchd ls | head -1``) would be a traceback and exit 1.
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())  # what is still buffered goes nowhere, quietly
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    handler = COMMANDS[args.command][2]
    if _takes_no_client(handler, args.command):
        return handler(args)
    if args.socket is not None and args.url is not None:
        _usage_error(args, f"both --socket {args.socket} and --url {args.url} given: use one")
    try:
        client = Client(socket=args.socket, url=args.url)
    except ValueError as error:
        _usage_error(args, str(error))
    try:
        return handler(args, client)
    except UsageError as error:
        _usage_error(args, str(error))
    except DaemonUnreachable as error:
        _say(error.message)
        return EXIT_UNREACHABLE
    except ScratchdError as error:
        _say(_refusal(error, args))
        return EXIT_REFUSED
    except OSError as error:  # preparing the lease's directories
        if isinstance(error, BrokenPipeError):
            raise
        _say(str(error))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def _serve(args: SimpleNamespace) -> int:
    """The daemon, when this Python and this installation can run it."""
    if sys.version_info < (3, 11):
        _say(f"serve needs Python 3.11 or newer; this is {sys.version.split()[0]}")
        return EXIT_REFUSED
    try:
        from scratchd.server import serve
    except ModuleNotFoundError as error:
        if (error.name or "scratchd").partition(".")[0] == "scratchd":
            raise
        _say(
            f"serve needs the server's dependencies ({error.name} is missing): pip install 'scratchd[server]'"
        )
        return EXIT_REFUSED
    return serve(args.config, args.log_level)


def _csi(args: SimpleNamespace) -> int:
    """The Kubernetes CSI node plugin (docs/kubernetes.md), when gRPC is installed."""
    try:
        from scratchd.csi.plugin import connect_to, serve
    except ModuleNotFoundError as error:
        if (error.name or "scratchd").partition(".")[0] == "scratchd":
            raise
        _say(f"csi needs gRPC ({error.name} is missing): pip install 'scratchd[csi]'")
        return EXIT_REFUSED
    return serve(args.endpoint, args.node_id, connect_to(args.socket, args.url))


def _refusal(error: ScratchdError, args: SimpleNamespace) -> str:
    """The daemon's code and message; a TTL over a limit in the unit the user wrote it in."""
    details = error.details if isinstance(error.details, dict) else {}
    ttl, limit = getattr(args, "ttl", None), details.get("max_ttl")
    if isinstance(ttl, Seconds) and isinstance(limit, int) and ttl > limit:
        whose = "your tenant's" if error.code == "quota_exceeded" else "the daemon's"
        return f"{error.code}: --ttl {ttl.text} is over {whose} limit: at most {_in_unit(limit, ttl.text)}"
    return f"{error.code}: {error.message}"


class UsageError(Exception):
    """Bad command-line input found after parsing; exits 2 like argparse's own errors."""


def _usage_error(args: SimpleNamespace, message: str) -> NoReturn:
    command_parser(args.command).error(message)


# -- parsing -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> SimpleNamespace:
    """Parse in two stages, building only the named command's parser.

    ``scratchd run`` starts on every CI job, and building all ten commands'
    parsers cost it ~6 ms more than building its own. When the command comes
    first, as it nearly always does, the top-level parser is not built either:
    all it would do is take the command, and a ``--`` right after it, and hand
    on the rest. Nor is ``run``'s, when its options are plainly spelled (see
    ``_quick_parse``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS and not _ambiguous_abbreviation(argv, WHERE_OPTIONS):
        args = SimpleNamespace(socket=None, url=None, command=argv[0])
        rest = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    else:  # options before the command, no command, --help, or an error to report
        args = _top_parser().parse_args(argv, namespace=SimpleNamespace())
        rest = args.arguments
        del args.arguments
    if args.command == "run":  # "cmd": its positional arguments (see _run_options)
        quick = _quick_parse(rest, (*WHERE_OPTIONS, *RUN_OPTIONS), "cmd", args)
        if quick is not None:
            return quick
    return command_parser(args.command).parse_args(rest, namespace=args)


# The add_argument actions _quick_parse knows, and their defaults.
_QUICK_ACTIONS: dict[str | None, object] = {None: None, "store_true": False, "append": None}


def _quick_parse(
    argv: list[str], options: Sequence[Option], remainder: str, namespace: SimpleNamespace
) -> SimpleNamespace | None:
    """``namespace`` with ``argv`` read as argparse would: ``options``, then the rest as ``remainder``.

    argparse costs every ``scratchd run`` 5 ms (44.0 against 39.0 ms, bench/tricks.py): its import, the gettext and
    locale it imports, building the parser. This reads the same options when
    each is spelled out in full (``--ttl 2h``, ``--ttl=2h``, ``-v``) and no
    value starts with ``-``. Anything else (``-h``, an abbreviation, a value
    that does not convert, an option it does not know) returns None, and
    argparse parses it all, errors and help included.
    """
    actions: dict[str, tuple[str, OptionSpec]] = {}
    values: dict[str, Any] = {}
    for flags, spec in options:
        action = spec.get("action")
        if (
            not spec.keys() <= {"metavar", "help", "type", "choices", "action"}
            or action not in _QUICK_ACTIONS
        ):
            return None
        # argparse's dest: the first long flag, without dashes, "-" as "_".
        dest = next((flag for flag in flags if flag.startswith("--")), flags[0]).lstrip("-").replace("-", "_")
        actions.update(dict.fromkeys(flags, (dest, spec)))
        values[dest] = _QUICK_ACTIONS[action]
    values.update(vars(namespace))  # as argparse: defaults only for what the namespace lacks
    position = 0
    while position < len(argv) and argv[position].startswith("-") and argv[position] != "--":
        arg = argv[position]
        flag, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag not in actions:
            return None
        dest, spec = actions[flag]
        position += 1
        if spec.get("action") == "store_true":
            if equals:
                return None
            values[dest] = True
            continue
        if not equals:
            if position == len(argv) or argv[position].startswith("-"):
                return None
            value = argv[position]
            position += 1
        try:
            converted = spec.get("type", str)(value)
        except Exception:  # argparse will say what is wrong with it
            return None
        if converted not in spec.get("choices", (converted,)):
            return None
        values[dest] = [*(values[dest] or ()), converted] if spec.get("action") == "append" else converted
    if _ambiguous_abbreviation(argv[position:], options):
        return None
    values[remainder] = argv[position:]
    return SimpleNamespace(**values)


def _ambiguous_abbreviation(argv: Sequence[str], options: Iterable[Option]) -> bool:
    """Whether argparse takes one of ``argv`` before a ``--`` for an abbreviation of two options.

    It refuses those wherever they are, even among the arguments it hands on
    (``scratchd ls --=x``) or takes as the command (``scratchd run make --p``:
    ``--pool`` or ``--placement``?).
    """
    flags = ["-h", "--help", *(flag for option_flags, _ in options for flag in option_flags)]
    for arg in argv[: argv.index("--") if "--" in argv else None]:
        if len(arg) < 2 or not arg.startswith("-") or arg.partition("=")[0] in flags:
            continue
        if arg.startswith("--"):
            matches = sum(flag.startswith(arg.partition("=")[0]) for flag in flags)
        else:  # a short option can run into its value: -vx is -v x
            matches = sum(flag == arg[:2] or flag.startswith(arg) for flag in flags)
        if matches > 1:
            return True
    return False


def _top_parser() -> argparse.ArgumentParser:
    """``scratchd [--socket PATH | --url URL] COMMAND ...``: the rest goes to the command's parser."""
    import argparse

    commands = "\n".join(f"  {name:<9} {help}" for name, (help, _, _) in COMMANDS.items())
    top = argparse.ArgumentParser(
        prog="scratchd",
        description="Lease scratch directories on the right filesystem from the scratchd daemon.",
        epilog=f"commands:\n{commands}\n\n'scratchd COMMAND --help' describes each one.",
        formatter_class=_formatter,
    )
    _add_options(top, WHERE_OPTIONS, default=None)
    top.add_argument("--version", action=_version_action(), nargs=0, help="print the version and exit")
    top.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="one of the commands below")
    top.add_argument("arguments", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return top


def _version_action() -> type[argparse.Action]:
    """``--version``: the installed distribution's, looked up only when asked."""
    import argparse

    class Version(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
            from importlib.metadata import version

            print(f"scratchd {version('scratchd')}")
            parser.exit()

    return Version


def command_parser(command: str) -> argparse.ArgumentParser:
    import argparse
    import re

    help, add_options, _ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"scratchd {command}", description=help, formatter_class=_formatter)
    # argparse reads `--ttl -5m` as an option with no value, and says only "expected one
    # argument"; as a value, the option's own check names it and the accepted forms.
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    # The same --socket/--url after the command; SUPPRESS keeps a value given before it.
    _add_options(parser, WHERE_OPTIONS, default=argparse.SUPPRESS)
    add_options(parser)
    return parser


def _formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's formatter, sized without ``import shutil`` (2 ms; argparse makes one per option)."""
    import argparse

    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            stdout = sys.__stdout__
            columns = os.get_terminal_size(stdout.fileno()).columns if stdout else 80
        except (ValueError, OSError):
            columns = 80
    return argparse.RawDescriptionHelpFormatter(prog, width=columns - 2)


def _invalid(message: str) -> Exception:
    """The error argparse reports as ``argument --X: <message>`` (argparse is imported only when used)."""
    import argparse

    return argparse.ArgumentTypeError(message)


class Seconds(int):
    """Whole seconds that remember how the user wrote them (``30d``), to answer in their unit."""

    text: str

    def __new__(cls, seconds: int, text: str) -> Seconds:
        self = super().__new__(cls, seconds)
        self.text = text
        return self


_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> Seconds:
    """Whole seconds, rounded up: the API takes integers, and ``1.5s`` must not shrink."""
    try:
        seconds = parse_duration(text)
    except UnitError as error:
        raise _invalid(str(error)) from None
    return Seconds(int(-(-seconds // 1)), text)


def _in_unit(seconds: int, written: str) -> str:
    """``seconds`` in the unit ``written`` uses (604800 after ``30d``: ``7d``), rounded down."""
    unit = written.strip()[-1:]
    unit = unit if unit in _UNIT_SECONDS else "s"
    whole, hundredths = divmod(seconds * 100 // _UNIT_SECONDS[unit], 100)
    return f"{whole}{f'.{hundredths:02d}'.rstrip('0') if hundredths else ''}{unit}"


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise _invalid(f"expected a whole number, 0 or more, got {text!r}")
    return count


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except UnitError as error:
        raise _invalid(str(error)) from None


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise _invalid(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _tool(name: str) -> str:
    from scratchd.presets import PRESETS, UnknownTool

    if name not in PRESETS:
        raise _invalid(str(UnknownTool(name)))
    return name


def _env(text: str) -> tuple[str, str]:
    """``VAR`` or ``VAR=SUBDIR``; SUBDIR stays inside the lease."""
    var, _, subdir = text.partition("=")
    if not var.isidentifier():
        raise _invalid(f"not a variable name: {var!r}")
    if subdir.startswith("/") or ".." in subdir.split("/"):
        raise _invalid(f"SUBDIR must stay inside the lease: {subdir!r}")
    return var, subdir.strip("/")


_KEY_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+=/-")
MAX_CACHE_KEY = 128


def _cache_key(text: str) -> str:
    """A cache key or fallback prefix, checked here so that a typo is exit 2, not the daemon's 422."""
    if not 0 < len(text) <= MAX_CACHE_KEY or not text[0].isascii() or not text[0].isalnum():
        raise _invalid(f"expected 1-{MAX_CACHE_KEY} characters starting with a letter or digit, got {text!r}")
    if not set(text) <= _KEY_CHARACTERS:
        raise _invalid(f"only letters, digits and . _ : @ + = / - may be in a cache key, got {text!r}")
    return text


def _option(*flags: str, **spec: Unpack[OptionSpec]) -> Option:
    """An ``add_argument`` call as data, for argparse and ``_quick_parse`` alike."""
    return flags, spec


WHERE_OPTIONS = (
    _option("--socket", metavar="PATH", help="daemon socket ($SCRATCHD_SOCKET)"),
    _option("--url", metavar="URL", help="daemon over TCP ($SCRATCHD_URL, token in $SCRATCHD_TOKEN)"),
)

# What `lease` and `run` share: the LeaseRequest, and tool presets.
PLACEMENT_OPTIONS = (
    _option("--near", metavar="P", help="place on P's mount (default: the current directory)"),
    _option("--pool", metavar="N", help="only this pool"),
    _option("--placement", metavar="M", choices=PLACEMENTS, help=" | ".join(PLACEMENTS)),
    _option("--ttl", metavar="D", type=_duration, help="lifetime unless renewed: 90s, 15m, 2h, 7d"),
    _option("--idle", metavar="D", type=_duration, help="end after D without a write"),
    _option("--max-size", metavar="S", type=_size, help="end when bigger than S: 512M, 10G"),
    _option("--expect", metavar="S", type=_size, help="space the job will need"),
    _option("--evictable", action="store_true", help="may be reclaimed under disk pressure"),
    _option("--label", metavar="K=V", type=_label, action="append", help="repeatable"),
    _option("--tool", metavar="T", type=_tool, action="append", help="tool preset, repeatable"),
    _option(
        "--cache-key",
        metavar="K",
        type=_cache_key,
        help="start from your kept cache of key K if there is one; kept under K when released",
    ),
    _option(
        "--cache-fallback",
        metavar="PREFIX",
        type=_cache_key,
        action="append",
        help="on a miss of --cache-key, the newest kept cache whose key starts with PREFIX; repeatable",
    ),
)

RUN_OPTIONS = (
    *PLACEMENT_OPTIONS,
    _option(
        "--env",
        metavar="VAR[=SUBDIR]",
        type=_env,
        action="append",
        help="set VAR to the lease (or a subdirectory)",
    ),
    _option(
        "--fallback",
        metavar="F",
        choices=FALLBACKS,
        help="when the daemon is unreachable: fail (exit 3, the default) or local: run the command in a private"
        " directory on --near's mount (else in $TMPDIR), deleted after ($SCRATCHD_FALLBACK)",
    ),
    _option(
        "--keep",
        metavar="WHEN",
        choices=KEEPS,
        help="keep the --cache-key cache: success (the default: when CMD exits 0), always or never",
    ),
    _option("--list-tools", action="store_true", help="print the tool presets and exit"),
    _option(
        "-v",
        "--verbose",
        action="store_true",
        help="say what is set and what is left alone, and whether a --cache-key lease started warm",
    ),
)


def _add_options(
    parser: argparse.ArgumentParser, options: Iterable[Option], **common: Unpack[OptionSpec]
) -> None:
    for flags, spec in options:
        parser.add_argument(*flags, **(spec | common))


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config (default: the embedded one)")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="debug adds a line for every lease a client starts or releases (default: %(default)s)",
    )


def _csi_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint", required=True, metavar="URL", help="where the kubelet calls: unix:///csi/csi.sock"
    )
    parser.add_argument(
        "--node-id",
        metavar="ID",
        help="this node's name to Kubernetes (default: $NODE_NAME, else the host name)",
    )


def _lease_options(parser: argparse.ArgumentParser) -> None:
    _add_options(parser, PLACEMENT_OPTIONS)
    parser.add_argument("--pid", metavar="N", type=int, help="end the lease when process N exits")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the API's JSON")
    output.add_argument("--shell", action="store_true", help="print export lines for eval")


def _run_options(parser: argparse.ArgumentParser) -> None:
    import argparse

    _add_options(parser, RUN_OPTIONS)
    parser.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="the command and its arguments"
    )
    parser.epilog = (
        "The command's exit status is run's (128+N for signal N). If run is killed, even with SIGKILL, the\n"
        "command is killed too. If the lease ends under it (over its size, released by an admin, its\n"
        "directory removed, ...), run says 'scratchd: lease ID ended: REASON', sends the command SIGTERM\n"
        f"(SIGKILL {KILL_AFTER_SECONDS:.0f} s later) and exits 4. Otherwise: 1 the daemon refused, 2 usage error,\n"
        "3 daemon unreachable (see --fallback)."
    )


def _id_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="the lease's id")


def _release_options(parser: argparse.ArgumentParser) -> None:
    _id_option(parser)
    parser.add_argument(
        "--discard", action="store_true", help="do not keep its directory as a cache (a --cache-key lease)"
    )


def _caches_options(parser: argparse.ArgumentParser) -> None:
    import argparse

    parser.add_argument("--key", metavar="K", type=_cache_key, help="only the caches of key K")
    parser.add_argument("--all", action="store_true", help="caches in use by a lease too")
    _json_option(parser)
    actions = parser.add_subparsers(dest="action", metavar="rm", title="subcommands")
    remove = actions.add_parser(
        "rm", help="delete kept caches (one in use is refused)", formatter_class=_formatter
    )
    _add_options(remove, WHERE_OPTIONS, default=argparse.SUPPRESS)
    remove.add_argument(
        "cache_ids", nargs="+", metavar="ID", help="a cache's id, as scratchd caches shows it"
    )


def _renew_options(parser: argparse.ArgumentParser) -> None:
    _id_option(parser)
    parser.add_argument(
        "--ttl", metavar="D", type=_duration, help="new lifetime from now (default: its own TTL)"
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the API's JSON")


def _ls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="ended leases too")
    parser.add_argument(
        "--label",
        metavar="K=V",
        type=_label,
        action="append",
        help="only leases with this label; repeatable: with all of them",
    )
    _json_option(parser)


def _show_options(parser: argparse.ArgumentParser) -> None:
    _id_option(parser)
    _json_option(parser)


def _events_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        metavar="N",
        type=_count,
        help="at most N events: the newest (default 50), or the first after --since",
    )
    parser.add_argument(
        "--since",
        metavar="SEQ",
        type=_count,
        help="the events after sequence number SEQ, oldest first (0: from the start)",
    )
    parser.add_argument("--follow", "-f", action="store_true", help="then print new ones as they come")
    parser.add_argument(
        "--json", action="store_true", help="the API's JSON (one event per line with --follow)"
    )


def _completion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=SHELLS, help=" | ".join(SHELLS))
    parser.epilog = (
        "bash: source <(scratchd completion bash), or save it as\n"
        "      ~/.local/share/bash-completion/completions/scratchd\n"
        "zsh:  source <(scratchd completion zsh), or save it as _scratchd in a directory of $fpath\n"
        "fish: scratchd completion fish | source, or save it as ~/.config/fish/completions/scratchd.fish"
    )


def _lease_request(args: SimpleNamespace) -> dict[str, object]:
    """LeaseRequest fields from the options given; the daemon's defaults for the rest."""
    if args.cache_fallback and not args.cache_key:
        raise UsageError("--cache-fallback is where to start on a miss of --cache-key: give --cache-key too")
    fields = {
        "near": os.path.abspath(args.near) if args.near else _cwd(),
        "pool": args.pool,
        "placement": args.placement,
        "ttl_seconds": args.ttl,
        "idle_timeout_seconds": args.idle,
        "max_bytes": args.max_size,
        "expected_bytes": args.expect,
        "evictable": args.evictable or None,
        "labels": dict(args.label) if args.label else None,
        "cache_key": args.cache_key,
        "cache_fallback": args.cache_fallback,
    }
    return {name: value for name, value in fields.items() if value is not None}


def _cwd() -> str | None:
    """The current directory, or None (no ``near``) if it was deleted under us."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


# -- lease, run ----------------------------------------------------------------


def cmd_lease(args: SimpleNamespace, client: Client) -> int:
    fields = _lease_request(args)
    if args.pid is not None:
        fields["pid"] = args.pid
    lease = client.create_lease(**fields)
    try:
        env = _lease_env(lease, args.tool or (), (), verbose=False)
    except OSError:
        _release(client, lease, succeeded=False)
        raise
    if args.json:
        _print_json(lease)
    elif args.shell:
        import shlex

        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}")
    else:
        print(lease["path"])
    return EXIT_OK


def cmd_run(args: SimpleNamespace, client: Client) -> int:
    if args.list_tools:
        print(_tools_table())
        return EXIT_OK
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("run needs a command: scratchd run [OPTIONS] -- CMD [ARGS…]")
    fallback = args.fallback or os.environ.get("SCRATCHD_FALLBACK") or "fail"
    if fallback not in FALLBACKS:
        raise UsageError(f"SCRATCHD_FALLBACK must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
    if args.keep and not args.cache_key:
        raise UsageError(f"--keep {args.keep} is about the lease's cache: give --cache-key too")
    request = _lease_request(args)
    try:
        lease = client.create_lease(**request, pid=os.getpid())
    except DaemonUnreachable as error:
        if fallback == "fail":
            raise
        return _run_local(command, args, request.get("near"), error)
    if args.verbose and lease.get("cache"):
        _say(_warmth(lease["cache"]))
    try:
        env = _lease_env(lease, args.tool or (), args.env or (), verbose=args.verbose)
        renewer = Renewer(client, lease["id"], lease["ttl_seconds"], on_error=_renew_failed)
        status, ended = _run_child(command, {**os.environ, **env}, renewer)
    except BaseException:
        _release(client, lease, succeeded=False)
        raise
    if ended:
        return EXIT_LEASE_ENDED
    try:
        released = _release(client, lease, succeeded=status == 0, keep=args.keep or "success")
    except ScratchdError as error:
        # The command ran: its status is the answer. The daemon ends the lease
        # anyway once this process exits (it is bound to our pid), and keeps nothing then.
        _say(f"could not release lease {lease['id']}: {error.message}")
        return status
    if args.verbose and lease.get("cache"):
        kept = (released.get("cache") or {}).get("kept_id")
        why = f"--keep {args.keep or 'success'}, exit status {status}"
        _say(f"kept as cache {kept} of key {lease['cache']['key']}" if kept else f"cache not kept ({why})")
    return status


def _release(client: Client, lease: Mapping[str, Any], *, succeeded: bool, keep: str = "success") -> dict:
    """Release ``lease``; one with a cache key is kept as ``keep`` says for a job that ``succeeded`` or not."""
    if not lease.get("cache"):
        return client.release(lease["id"])
    return client.release(lease["id"], keep=keeps(keep, succeeded))


def _warmth(cache: Mapping[str, Any]) -> str:
    """Whether a lease started warm: from which kept cache, of which key; or cold."""
    if cache.get("hit") is None:
        return f"cold start: no kept cache of key {cache['key']} or its fallbacks"
    how = "exact" if cache["hit"] == "exact" else f"fallback for {cache['key']}"
    matched = cache.get("matched_key") or cache["key"]
    return f"warm start: cache {cache.get('cache_id')} of key {matched} ({how}), kept {_relative(cache.get('kept_at'))}"


def _run_local(command: Sequence[str], args: SimpleNamespace, near: object, error: DaemonUnreachable) -> int:
    """``--fallback local``: the command runs in a private directory of its own, deleted when it ends.

    The variables are a lease's, with ``SCRATCHD_LEASE_ID`` empty: there is no lease.
    """
    directory, link_mode = _local_directory(near if isinstance(near, str) else None)
    _say(f"{error.message}; running in {directory} instead (--fallback local)")
    try:
        lease = {"id": "", "path": directory, "link_mode": link_mode}
        env = _lease_env(lease, args.tool or (), args.env or (), verbose=args.verbose)
        status, _ = _run_child(command, {**os.environ, **env}, None)
    finally:
        _remove_tree(directory)
    return status


def _local_directory(near: str | None) -> tuple[str, str | None]:
    """A new private directory (mode 0700), and the link mode between it and ``near``.

    On ``near``'s mount when we can write there, as a lease's pool would be: in
    the writable directory nearest that mount's root on the way down to
    ``near`` (the mount's root for root; often ``$HOME`` or the checkout for
    others), to stay out of the project when it can. Else in the temp directory.
    """
    import tempfile

    for directory in _way_down_to(near) if near is not None else ():
        if os.access(directory, os.W_OK | os.X_OK):
            try:
                return tempfile.mkdtemp(prefix=".scratchd-local-", dir=directory), "hardlink"
            except OSError:
                continue
    return tempfile.mkdtemp(prefix="scratchd-local-"), "copy" if near is not None else None


def _way_down_to(near: str) -> list[str]:
    """The directories from the root of ``near``'s mount down to ``near`` (or its nearest existing ancestor)."""
    from scratchd.mounts import mount_of, read_mounts, resolve_near

    try:
        path = resolve_near(near)
        top = mount_of(path, read_mounts()).mount_point
    except (OSError, LookupError, ValueError):
        return []
    way_up = [path]
    while way_up[-1] != top and way_up[-1] != "/":
        way_up.append(os.path.dirname(way_up[-1]))
    return way_up[::-1]


def _remove_tree(path: str) -> None:
    """Delete ``path`` and what the command left in it, never following a symlink.

    A directory the command made read-only (Go's module cache is) is made
    writable once and tried again; what still cannot go is said, not raised:
    the command's status is the answer.
    """
    import shutil
    import stat

    retried = set()

    def unlock(
        function: Callable[..., object],
        failed: str,
        exc_info: tuple[type[BaseException], BaseException, object],
    ) -> None:
        if not os.path.lexists(failed):  # gone with a directory tried again below
            return
        if failed in retried:
            raise exc_info[1]
        retried.add(failed)
        for directory in (os.path.dirname(failed), failed):
            if stat.S_ISDIR(os.lstat(directory).st_mode):
                os.chmod(directory, 0o700)
        if stat.S_ISDIR(os.lstat(failed).st_mode):
            shutil.rmtree(failed, onerror=unlock)
        else:
            os.unlink(failed)

    try:
        shutil.rmtree(path, onerror=unlock)
    except OSError as error:
        _say(f"could not delete {path}: {error}")


def _lease_env(
    lease: Mapping[str, object], tools: Sequence[str], extra: Iterable[tuple[str, str]], *, verbose: bool
) -> dict[str, str]:
    """SCRATCHD_LEASE_ID/PATH, tool presets and ``--env`` variables, with their directories created."""
    path = str(lease["path"])
    env = {"SCRATCHD_LEASE_ID": str(lease["id"]), "SCRATCHD_LEASE_PATH": path}
    directories = []
    carried: list[tuple[str, str]] = []
    if tools:
        from scratchd.presets import lease_link_mode, preset_env

        plan = preset_env(tools, path, lease_link_mode(lease), os.environ)
        env.update(plan.env)
        directories += plan.directories
        carried = [(source, target) for source, target in plan.carried if os.path.exists(source)]
        if verbose:
            for name in plan.skipped:
                _say(f"{name} is already set ({os.environ[name]!r}): left alone")
    for var, subdir in extra:
        env[var] = os.path.join(path, subdir) if subdir else path
        directories.append(env[var])
    for directory in directories:
        os.makedirs(directory, exist_ok=True)
    if carried:
        _carry(carried, verbose=verbose)
    if verbose:
        _say(
            f"lease {lease['id']} in pool {lease.get('pool')} at {path}"
            if lease["id"]
            else f"local directory {path}"
        )
        for name, value in env.items():
            _say(f"  {name}={value}")
    return env


def _carry(files: Iterable[tuple[str, str]], *, verbose: bool) -> None:
    """Copy the user's config files into a tool home the preset moved into the lease."""
    import shutil

    for source, target in files:
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        if verbose:
            _say(f"carried {source} into the lease: {target}")


def _run_child(
    command: Sequence[str], env: Mapping[str, str], renewer: Renewer | None
) -> tuple[int, str | None]:
    """Run ``command``, watching the lease; its exit status (128+N if signal N killed it),
    and the lease's end reason if it ended under the command.

    Signals meant for us are forwarded to it. The lease is watched from SIGALRM,
    every second, in this, the only thread, while we wait: no thread to start
    (``import threading`` alone is 1 ms of every CI job's start-up), and every
    signal interrupts the wait. The wait does not reap the command, so its pid
    stays its own until no handler can signal it any more. ``_signal`` rather
    than ``signal``, whose import builds enums of every signal (1 ms); the
    functions are the same, on plain ints.
    """
    import _signal as signal

    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    child = 0
    ended: str | None = None

    def forward(signum: int, frame: object) -> None:
        if child and not _sent_by_terminal(signum):
            os.kill(child, signum)

    def watch(signum: int, frame: object) -> None:
        # A one-shot timer, re-armed after each look: two never overlap.
        nonlocal ended
        assert renewer is not None  # the timer is armed only for a lease
        if ended:  # KILL_AFTER_SECONDS after the SIGTERM, and still there
            os.kill(child, signal.SIGKILL)
            return
        ended = renewer.check()
        if ended:
            _say(f"lease {renewer.lease_id} ended: {ended}")
            os.kill(child, signal.SIGTERM)
            signal.setitimer(signal.ITIMER_REAL, KILL_AFTER_SECONDS)
        else:
            signal.setitimer(signal.ITIMER_REAL, min(WATCH_SECONDS, renewer.interval))

    handlers = {**dict.fromkeys(forwarded, forward), signal.SIGALRM: watch}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        # Blocked until `child` is known, so none is lost in between.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
        try:
            # What Python ignores (SIGPIPE, SIGXFSZ) must not stay ignored in the child.
            child = _spawn(command, env, mask, (*handlers, signal.SIGPIPE, signal.SIGXFSZ))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if renewer is not None:
            signal.setitimer(signal.ITIMER_REAL, min(WATCH_SECONDS, renewer.interval))
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code), ended


def _spawn(
    command: Sequence[str], env: Mapping[str, str], mask: Iterable[int], defaults: Iterable[int]
) -> int:
    """Start ``command`` as ``posix_spawnp`` would, bound to die with us; its pid.

    The child asks the kernel for SIGKILL when its parent dies, so even a
    SIGKILL of ``run`` cannot leave the command writing into a lease that is
    reclaimed for ``run``'s exit. posix_spawn has no such attribute, hence fork
    and exec: starting ``true`` so takes 3.0 ms where posix_spawn (a vfork) took
    0.8 ms, the guarantee's price on every run (docs/limits.md). A failed exec
    says why and exits 127 (not found) or 126, as a shell does.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        import _signal as signal

        for signum in defaults:
            signal.signal(signum, signal.SIG_DFL)
        _die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # run died before we asked: no signal will come
            os.kill(os.getpid(), signal.SIGKILL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            os.execvpe(command[0], list(command), env)
        except OSError as error:
            os.write(2, f"scratchd: {command[0]}: {error.strerror}\n".encode())
            os._exit(127 if isinstance(error, FileNotFoundError) else 126)
    finally:
        os._exit(127)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(signum: int) -> None:
    """``prctl(PR_SET_PDEATHSIG, signum)``, through ``_ctypes`` alone.

    In the child, before the command starts: the ``ctypes`` package would add
    2 ms to every ``scratchd run`` (its module builds every C type), where one
    int type and one function type are all this call needs.
    """
    import _ctypes

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL
        _restype_ = Int

    # dlopen(NULL) is the program itself (dlopen(3)); typeshed's dlopen wants a path.
    prctl = Function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))  # type: ignore[arg-type]
    prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _sent_by_terminal(signum: int) -> bool:
    """Whether a Ctrl-C (or Ctrl-\\) from our terminal already reached the child.

    The terminal signals its whole foreground process group, which the child
    shares with us: forwarding would deliver it twice.
    """
    import _signal as signal

    if signum not in (signal.SIGINT, signal.SIGQUIT):
        return False
    try:
        tty = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def _renew_failed(error: ScratchdError) -> None:
    _say(f"renewing the lease failed: {error.message}")


def _tools_table() -> str:
    from scratchd.presets import PRESETS

    rows: list[tuple[str, ...]] = [
        ("TOOL", "VARIABLES (under <lease>/<tool>)", "link_mode copy", "link_mode clone")
    ]
    for preset in PRESETS.values():
        variables = [*preset.paths, *(f"{k}=<lease>/{v}" for k, v in preset.scratch.items())]
        variables += [f"{k}={v}" for k, v in preset.fixed.items()]
        variables += [f"{k}+={v.replace('{dir}', '<dir>')}" for k, v in preset.append.items()]
        modes = [
            _both_prefixes([f"{k}={v}" for k, v in preset.modes[mode].items()]) or "-"
            for mode in ("copy", "clone")
        ]
        rows.append((preset.name, _both_prefixes(variables), *modes))
    return _columns(rows)


def _both_prefixes(words: list[str]) -> str:
    """``npm_config_x pnpm_config_x`` as ``{npm,pnpm}_config_x``: pnpm's settings go under both."""
    pnpm = {word for word in words if word.startswith("pnpm_config_")}
    shown = [f"{{npm,pnpm}}_{word[4:]}" if f"p{word}" in pnpm else word for word in words if word not in pnpm]
    return " ".join(shown)


# -- renew, release, ls, show, pools, usage, events ----------------------------


def cmd_renew(args: SimpleNamespace, client: Client) -> int:
    lease = client.renew(args.id, args.ttl)
    print(f"{lease['id']} expires {lease['expires_at']} ({_relative(lease['expires_at'])})")
    return EXIT_OK


def cmd_release(args: SimpleNamespace, client: Client) -> int:
    client.release(args.id, keep=False if args.discard else None)
    return EXIT_OK


def cmd_caches(args: SimpleNamespace, client: Client) -> int:
    """The kept caches (with ``--all``, those in use too); ``caches rm ID…`` deletes kept ones."""
    if args.action == "rm":
        return _drop_caches(args.cache_ids, client)
    data = client.caches(key=args.key)
    if not args.all:
        data["caches"] = [cache for cache in data["caches"] if cache["state"] == "free"]
    if args.json:
        _print_json(data)
        return EXIT_OK
    _table(
        ["ID", "KEY", "POOL", "STATE", "SIZE", "KEPT", "LAST USED", "HITS"],
        [
            [
                cache["id"],
                cache["key"],
                cache["pool"],
                cache["state"],
                format_size(cache.get("bytes")),
                _relative(cache.get("kept_at")),
                _relative(cache.get("last_used_at")),
                str(cache.get("hits", "-")),
            ]
            for cache in data["caches"]
        ],
    )
    return EXIT_OK


def _drop_caches(cache_ids: Iterable[str], client: Client) -> int:
    """Delete each cache; one refused (in use, unknown) is said, and the rest still go."""
    status = EXIT_OK
    for cache_id in cache_ids:
        try:
            client.drop_cache(cache_id)
        except DaemonUnreachable:
            raise
        except ScratchdError as error:
            _say(f"{cache_id}: {error.code}: {error.message}")
            status = EXIT_REFUSED
    return status


def cmd_ls(args: SimpleNamespace, client: Client) -> int:
    """The leases; with several ``--label``, the daemon filters by the first and this by the rest."""
    labels = args.label or []
    data = client.list_leases(
        state="all" if args.all else None, label="=".join(labels[0]) if labels else None
    )
    if labels[1:]:
        data["leases"] = [
            lease
            for lease in data["leases"]
            if all((lease.get("labels") or {}).get(k) == v for k, v in labels[1:])
        ]
    if args.json:
        _print_json(data)
        return EXIT_OK
    # With --all, STATE (active, or why it ended) takes the place of EXPIRES: both do not fit 80 columns.
    header = ["ID", "POOL", "TENANT", "USED", "STATE" if args.all else "EXPIRES", "LABELS"]
    rows = []
    for lease in data["leases"]:
        active = lease["state"] == "active"
        if args.all:
            state = "active" if active else str(lease["end_reason"])
        else:
            state = _relative(lease["expires_at"])
        used = format_size((lease.get("usage") or {}).get("bytes"))
        rows.append(
            [lease["id"], lease["pool"], str(lease["tenant"]), used, state, _labels(lease.get("labels"))]
        )
    _table(header, rows)
    return EXIT_OK


def cmd_show(args: SimpleNamespace, client: Client) -> int:
    lease = client.get_lease(args.id)
    if args.json:
        _print_json(lease)
        return EXIT_OK
    usage = lease.get("usage") or {}
    state = (
        lease["state"]
        if lease["state"] == "active"
        else f"ended: {lease['end_reason']} {_relative(lease['ended_at'])}"
    )
    same = {True: "yes", False: "no", None: "unknown (no near)"}[lease.get("same_filesystem")]
    rows = [
        ("id", lease["id"]),
        ("path", lease["path"]),
        ("state", state),
        (
            "pool",
            f"{lease['pool']} (mount {lease.get('mount_point') or '-'}, same filesystem as near: {same})",
        ),
        ("tenant", f"{lease['tenant']} (uid {lease.get('uid')})"),
        ("created", _relative(lease["created_at"])),
        ("expires", f"{_relative(lease['expires_at'])} (ttl {format_duration(lease.get('ttl_seconds'))})"),
        ("idle timeout", format_duration(lease.get("idle_timeout_seconds"))),
        ("last activity", _relative(lease.get("last_activity_at"))),
        ("pid", str(lease["pid"]) if lease.get("pid") is not None else "-"),
        (
            "used",
            f"{format_size(usage.get('bytes'))} in {usage.get('files', '-')} files (measured {_relative(usage.get('measured_at'))})",
        ),
        ("max size", format_size(lease.get("max_bytes"))),
        ("expected", format_size(lease.get("expected_bytes"))),
        ("evictable", "yes" if lease.get("evictable") else "no"),
        ("labels", _labels(lease.get("labels"))),
    ]
    print(_columns(rows))
    return EXIT_OK


def cmd_pools(args: SimpleNamespace, client: Client) -> int:
    data = client.pools()
    if args.json:
        _print_json(data)
        return EXIT_OK
    _pool_table(data["pools"], ("POOL", "STATE", "FS", "SIZE", "FREE", "LEASED", "LEASES", "CACHES", "PATH"))
    return EXIT_OK


# Each column a pool table may show: its heading, and how a pool's JSON shows in it.
_POOL_COLUMNS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "POOL": lambda pool: pool["name"],
    "STATE": lambda pool: pool["state"],
    "FS": lambda pool: str(pool.get("fstype") or "-"),
    "SIZE": lambda pool: format_size(pool.get("capacity_bytes")),
    "FREE": lambda pool: format_size(pool.get("free_bytes")),
    "RESERVE": lambda pool: format_size(pool.get("reserve_bytes")),
    "RESERVED": lambda pool: format_size(pool.get("reserved_bytes")),
    "LEASED": lambda pool: format_size(pool.get("leased_bytes")),
    "LEASES": lambda pool: str(pool.get("active_leases", "-")),
    "CACHES": lambda pool: _cached(pool.get("cache_entries"), pool.get("cache_bytes")),
    "PATH": lambda pool: pool["path"],
}


def _cached(entries: int | None, size: int | None) -> str:
    """``3 (1.2G)``: kept caches and their size; ``-`` from a daemon that keeps none."""
    return "-" if entries is None else f"{entries} ({format_size(size)})"


def _pool_table(pools: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    _table(list(columns), [[_POOL_COLUMNS[column](pool) for column in columns] for pool in pools])


def cmd_usage(args: SimpleNamespace, client: Client) -> int:
    data = client.usage()
    if args.json:
        _print_json(data)
        return EXIT_OK
    _pool_table(
        data.get("pools", []),
        ("POOL", "STATE", "SIZE", "FREE", "RESERVE", "RESERVED", "LEASED", "LEASES", "CACHES"),
    )
    print()
    _table(
        ["TENANT", "LEASES", "USED", "RESERVED", "CACHED"],
        [
            [
                str(t["tenant"]),
                str(t["active_leases"]),
                format_size(t.get("bytes")),
                format_size(t.get("reserved_bytes")),
                format_size(t.get("cache_bytes")),
            ]
            for t in data.get("tenants", [])
        ],
    )
    print()
    _table(
        ["LARGEST LEASES", "POOL", "TENANT", "USED"],
        [
            [
                lease["id"],
                lease["pool"],
                str(lease["tenant"]),
                format_size((lease.get("usage") or {}).get("bytes")),
            ]
            for lease in data.get("largest_leases", [])
        ],
    )
    reclaim = data.get("reclaim") or {}
    reasons = ", ".join(f"{reason} {count}" for reason, count in (reclaim.get("by_reason") or {}).items())
    print()
    _summary(
        f"reclaim: {reclaim.get('pending', 0)} pending ({format_size(reclaim.get('pending_bytes', 0))}), "
        f"{reclaim.get('reclaimed_total', 0)} done ({format_size(reclaim.get('reclaimed_bytes_total', 0))})"
        + (f": {reasons}" if reasons else "")
    )
    if "caches" in data:
        _summary(_caches_line(data["caches"]))
    return EXIT_OK


def _caches_line(caches: Mapping[str, Any]) -> str:
    """``caches: 3 kept (1.2G); 8 hits, 2 misses (80% hit); 1 dropped: max_age 1``."""
    hits, misses = caches.get("hits_total", 0), caches.get("misses_total", 0)
    rate = f" ({100 * hits / (hits + misses):.0f}% hit)" if hits + misses else ""
    reasons = ", ".join(f"{reason} {count}" for reason, count in (caches.get("by_reason") or {}).items())
    return (
        f"caches: {caches.get('entries', 0)} kept ({format_size(caches.get('bytes', 0))}); "
        f"{hits} hits, {misses} misses{rate}; {caches.get('dropped_total', 0)} dropped"
        + (f": {reasons}" if reasons else "")
    )


def cmd_events(args: SimpleNamespace, client: Client) -> int:
    """The newest events (or those after ``--since``), oldest first; with ``--follow``, then the new ones.

    Ctrl-C is how one stops following: it ends the command with 0.
    """
    try:
        last = _print_events(args, client)
        if args.follow:
            _follow_events(args, client, last)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _print_events(args: SimpleNamespace, client: Client) -> int:
    """Print what ``-n`` and ``--since`` ask for, and how to see more; the last seq printed (or seen)."""
    if args.since is None:
        events, more, last = _newest_events(client, 50 if args.n is None else args.n)
    else:
        events, more = _events_after(client, args.since, args.n)
        last = events[-1]["seq"] if events else args.since
    if args.json and not args.follow:
        _print_json({"events": events})
    else:
        for event in events:
            print(_json_text(event) if args.json else _event_line(event))
    if more and events:
        sys.stdout.flush()  # the rows before the hint about them, even in one file; none if stdout is gone
        if args.since is None:
            _say(
                f"the newest events, from seq {events[0]['seq']}, shown; older ones: -n N, or --since SEQ"
                " for all after SEQ (0: from the first)"
            )
        else:
            _say(f"the events after seq {args.since} up to {last} shown; more: --since {last}")
    return last


def _follow_events(args: SimpleNamespace, client: Client, last: int) -> None:
    """Print the events after ``last`` as they come, until stdout's reader goes away."""
    import select

    sys.stdout.flush()
    reader_gone = select.poll()
    reader_gone.register(sys.stdout.fileno(), 0)  # a pipe whose reader left reports POLLERR all the same
    while True:
        page = client.events(since=last, limit=EVENTS_PAGE)["events"]
        for event in page:
            print(_json_text(event) if args.json else _event_line(event))
        sys.stdout.flush()
        if page:
            last = page[-1]["seq"]
        # Caught up: wait for more, but not for a reader that left (`| head -1`) while it is quiet.
        if len(page) < EVENTS_PAGE and reader_gone.poll(FOLLOW_SECONDS * 1000):
            raise BrokenPipeError


def _newest_events(client: Client, count: int) -> tuple[list[dict], bool, int]:
    """The newest ``count`` events, oldest first; whether older ones exist; the newest seq (0 if none)."""
    found: list[dict] = []
    before = None
    while len(found) <= count:  # one more than asked: is there more?
        limit = min(count + 1 - len(found), EVENTS_PAGE)
        page = client.events(order="desc", limit=limit, before=before)["events"]
        found += page
        if len(page) < limit:
            break
        before = page[-1]["seq"]
    return found[:count][::-1], len(found) > count, found[0]["seq"] if found else 0


def _events_after(client: Client, since: int, count: int | None) -> tuple[list[dict], bool]:
    """The events after ``since``, oldest first, all or the first ``count``; whether more follow those."""
    found: list[dict] = []
    while count is None or len(found) <= count:
        limit = EVENTS_PAGE if count is None else min(count + 1 - len(found), EVENTS_PAGE)
        page = client.events(since=since, limit=limit)["events"]
        found += page
        if len(page) < limit:
            break
        since = page[-1]["seq"]
    if count is None:
        return found, False
    return found[:count], len(found) > count


def _event_line(event: Mapping[str, object]) -> str:
    fields = (event.get("lease_id"), event.get("pool"), event.get("tenant"), event.get("reason"))
    return f"{event['seq']:>6} {event['at']} {event['kind']:<18} " + " ".join(
        str(f) for f in fields if f is not None
    )


# -- output --------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"scratchd: {message}", file=sys.stderr)


def _print_json(data: object) -> None:
    """The API's body as it came: one line, serialized as the daemon does."""
    print(_json_text(data))


def _json_text(data: object) -> str:
    import json  # only for --json: not on `scratchd run`'s path

    return json.dumps(data)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Aligned columns; on a terminal as wide as it is, off one (a pipe, a CI log) each row on one line.

    To fit, the columns after the first (an id or a name people copy, kept
    whole) fold, the widest first, down to their header's width.
    """
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    columns = _terminal_columns()
    if columns is not None:
        import textwrap

        room = columns - 2 * (len(widths) - 1)
        while sum(widths) > room:
            widest = max(range(1, len(widths)), key=lambda i: widths[i] - len(header[i]), default=0)
            if not widest or widths[widest] <= len(header[widest]):
                break  # as narrow as it goes: let the terminal wrap the rest
            widths[widest] -= 1
        folded = [
            [
                textwrap.wrap(cell, width, break_on_hyphens=False) or [""]
                for cell, width in zip(row, widths, strict=True)
            ]
            for row in table
        ]
    else:
        folded = [[[cell] for cell in row] for row in table]
    for row in folded:
        for line in range(max(len(cell) for cell in row)):
            parts = [
                (cell[line] if line < len(cell) else "").ljust(width)
                for cell, width in zip(row, widths, strict=True)
            ]
            print("  ".join(parts).rstrip())


def _summary(line: str) -> None:
    """A line of totals: folded to a terminal's width under a hanging indent, whole off one."""
    columns = _terminal_columns()
    if columns is None or len(line) <= columns:
        print(line)
        return
    import textwrap

    print(textwrap.fill(line, columns, subsequent_indent="  ", break_on_hyphens=False))


def _terminal_columns() -> int | None:
    """The terminal's width when stdout is one (``$COLUMNS`` first, as ``shutil`` reads it), else None."""
    if not sys.stdout.isatty():
        return None
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            return os.get_terminal_size(sys.stdout.fileno()).columns
        except OSError:
            return 80


def _columns(rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns: for text people copy whole (paths), which a table would fold."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    )


def _labels(labels: object) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) if isinstance(labels, dict) and labels else "-"


def _relative(timestamp: object) -> str:
    """``in 55m`` or ``5m ago`` for an RFC 3339 time from the API."""
    if not isinstance(timestamp, str):
        return "-"
    import time
    from datetime import datetime

    seconds = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() - time.time()
    return f"in {format_duration(seconds)}" if seconds >= 0 else f"{format_duration(-seconds)} ago"


def cmd_completion(args: SimpleNamespace) -> int:
    from scratchd.completion import script

    commands = [(name, help, command_parser(name)) for name, (help, _, _) in COMMANDS.items()]
    print(script(args.shell, _top_parser(), commands), end="")
    return EXIT_OK


# name: (help, options, handler); the LOCAL_COMMANDS' handlers take no client.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler | LocalHandler]] = {
    "serve": ("run the daemon", _serve_options, _serve),
    "lease": ("take a lease and print its path", _lease_options, cmd_lease),
    "run": ("run a command in a lease, renewed while it runs, released after", _run_options, cmd_run),
    "renew": ("extend a lease", _renew_options, cmd_renew),
    "release": (
        "end a lease: its directory deleted, or kept as a warm cache (a --cache-key lease)",
        _release_options,
        cmd_release,
    ),
    "ls": ("list leases", _ls_options, cmd_ls),
    "show": ("describe one lease", _show_options, cmd_show),
    "pools": ("list pools and their space", _json_option, cmd_pools),
    "usage": ("space by pool and tenant, largest leases", _json_option, cmd_usage),
    "caches": (
        "the warm caches kept by key; caches rm ID… deletes some",
        _caches_options,
        cmd_caches,
    ),
    "events": ("what happened: the newest events, oldest of them first", _events_options, cmd_events),
    "completion": ("print a shell completion script: bash, zsh or fish", _completion_options, cmd_completion),
    "csi": ("serve the Kubernetes CSI node plugin (needs scratchd[csi])", _csi_options, _csi),
}
LOCAL_COMMANDS = ("serve", "completion", "csi")


def _takes_no_client(handler: Handler | LocalHandler, command: str) -> TypeIs[LocalHandler]:
    """Whether ``handler``, ``command``'s, is a LOCAL_COMMANDS' one, which takes no client."""
    return command in LOCAL_COMMANDS
