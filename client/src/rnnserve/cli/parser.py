"""The argument parser: every command with its flags, help and examples."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from rnnserve import __version__
from rnnserve.cli.commands import (
    cmd_append,
    cmd_completion,
    cmd_convert,
    cmd_create,
    cmd_delete,
    cmd_export,
    cmd_fork,
    cmd_generate,
    cmd_health,
    cmd_import,
    cmd_predict,
    cmd_set,
    cmd_step,
)
from rnnserve.cli.compare import cmd_plot, cmd_show, cmd_watch
from rnnserve.cli.exit_codes import EXIT_CODES_HELP, PROG
from rnnserve.cli.flags import (
    _add_chart_size_flags,
    _add_config_flags,
    _add_setting_flags,
    _connection_options,
    _nonnegative_int,
    _positive_int,
    _seconds,
)
from rnnserve.cli.jobs import add_job_commands, cmd_train_or_start
from rnnserve.cli.listing import add_list_flags, cmd_list
from rnnserve.cli.output import Output
from rnnserve.cli.presets import cmd_presets
from rnnserve.cli.tensorboard import cmd_tensorboard
from rnnserve.client import DEFAULT_ADDRESS, Client

MAIN_EPILOG = f"""\
examples:
  rnnserve create input.txt --id shakespeare      # prints the session id
  rnnserve train shakespeare --steps 5000 --sample-length 80
  rnnserve generate shakespeare --length 500 --prime "ROMEO:" --seed 1
  rnnserve plot shakespeare --output loss.png     # or in the terminal; watch --plot: live
  rnnserve plot small big                         # compare sessions: one line each
  rnnserve list --sort val_loss --state ready     # also --watch: redraw every 2 s
  rnnserve tensorboard small big --logdir runs    # then: tensorboard --logdir runs
  rnnserve presets                                # which preset to pick
  eval "$(rnnserve completion bash)"              # tab-completes commands, flags and ids
  rnnserve --json list | jq .session_id
  rnnserve --address server:50051 --token "$TOKEN" --ca-file ca.pem health

environment:
  RNNSERVE_ADDRESS   default for --address ({DEFAULT_ADDRESS} if unset)
  RNNSERVE_TOKEN     default for --token
  RNNSERVE_CA_FILE   default for --ca-file

Errors are one line on stderr. With --json every result is one JSON object per line on
stdout (proto field names; int64 as numbers; enums as names).

{EXIT_CODES_HELP}"""


Command = Callable[[Client, argparse.Namespace, Output], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to an rnnserve server: create character-level RNN sessions, "
        "train them, watch their loss and sample text from them.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_options(with_defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _connection_options(with_defaults=False)

    def command(name: str, func: Command, help: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        sub.set_defaults(func=func)
        return sub

    p = command(
        "create",
        cmd_create,
        "create a session from text; prints its id",
        "  rnnserve create input.txt --id shakespeare\n"
        "  cat *.py | rnnserve create --hidden-size 256 --batch-size 32\n"
        "  rnnserve create --text Hallo --preset notebook --id hallo\n"
        "  rnnserve create input.txt --preset quality --validation-fraction 0.1\n"
        "\n`rnnserve presets` says what each preset is for and what it measured.\n",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="text file ('-' or piped: stdin)")
    p.add_argument("--text", help="the text itself instead of a file")
    p.add_argument("--id", default="", help="session id (default: the server makes one)")
    p.add_argument("--alphabet", default="", help="fix the vocabulary (default: the text's)")
    _add_config_flags(p)

    p = command(
        "list",
        cmd_list,
        "list the sessions: a table to sort, filter and refresh",
        "  rnnserve list\n"
        "  rnnserve list --sort val_loss            # best validation loss first\n"
        "  rnnserve list --sort chars/s --reverse   # fastest first\n"
        "  rnnserve list --state training --watch   # redraw every 2 s until Ctrl-C\n"
        "  rnnserve --json list | jq -r .session_id\n",
    )
    p.add_argument("--page-size", type=_positive_int, default=100, help=argparse.SUPPRESS)
    add_list_flags(p)

    p = command(
        "show",
        cmd_show,
        "show a session's config and progress; several side by side (* marks rows that differ)",
        "  rnnserve show hallo\n  rnnserve show shakespeare shakespeare-lr1e-4\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")

    p = command(
        "delete",
        cmd_delete,
        "delete sessions (asks first if one is training; --yes skips the question)",
        "  rnnserve delete hallo\n  rnnserve delete a b c\n  rnnserve delete shakespeare --yes\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="don't ask before deleting a session that is training",
    )

    p = command(
        "append",
        cmd_append,
        "add text to a session's corpus (streamed in chunks)",
        "  rnnserve append shakespeare more.txt\n  cat notes/*.txt | rnnserve append notes\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("file", nargs="?", metavar="FILE", help="text file ('-' or piped: stdin)")
    p.add_argument("--text", help="the text itself instead of a file")

    p = command(
        "step",
        cmd_step,
        "apply one optimizer update",
        "  rnnserve step hallo\n  rnnserve step hallo --text 'Hallo'\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--text", help="train on this text from a zero state instead of the corpus")

    p = command(
        "train",
        cmd_train_or_start,
        "apply many updates with a progress bar; Ctrl-C cancels cleanly. With --detach, "
        "start a training job the server runs on its own (prints its name)",
        "  rnnserve train shakespeare --steps 5000\n"
        "  rnnserve train shakespeare --steps 100000 --detach   # then: attach, stop, jobs\n"
        "  rnnserve train shakespeare --steps 100000 --max-seconds 60 --sample-length 80\n"
        "  rnnserve --json train hallo --steps 30 --report-every 10\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--steps", type=_positive_int, default=1000, help="updates (default 1000)")
    p.add_argument(
        "--until-step",
        type=_positive_int,
        metavar="N",
        help="instead of --steps: train until the session is at step N; a call cut off (a lost "
        "connection, a replica that died) is retried for up to 60 s, and never trains past N",
    )
    p.add_argument(
        "--report-every",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="progress every N updates (default 0: about once a second)",
    )
    p.add_argument(
        "--sample-length",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="add an N-character sample to each progress report",
    )
    p.add_argument(
        "--max-seconds",
        type=_seconds,
        metavar="S",
        help="stop (cancel cleanly) after S seconds even if steps remain (with --detach: "
        "the job's training-time budget, counted across server restarts)",
    )
    p.add_argument(
        "--until-loss",
        type=float,
        metavar="NATS",
        help="stop once the loss reaches NATS per char (the validation loss with a "
        "validation split, else the smoothed loss)",
    )
    p.add_argument(
        "--patience",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="early stopping: stop after N validation measurements without a new best "
        "(needs a validation split)",
    )
    p.add_argument(
        "--eval-every",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="measure the validation loss every N updates (default: at each report)",
    )
    p.add_argument(
        "--sample-temperature",
        type=float,
        metavar="T",
        help="temperature of the samples (default 1; 0 greedy)",
    )
    p.add_argument("--sample-prime", default="", metavar="TEXT", help="start each sample with TEXT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--detach",
        action="store_true",
        help="start a training job the server owns and exit (prints its name): it goes on "
        "without this command and after a server restart; see attach, stop, jobs",
    )
    p.add_argument(
        "--warmup-steps",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="with --detach: raise the learning rate linearly from 0 over the first N updates",
    )
    p.add_argument(
        "--decay",
        choices=["cosine", "linear"],
        help="with --detach: then decay it to --min-learning-rate at the job's last update",
    )
    p.add_argument(
        "--min-learning-rate",
        type=float,
        metavar="LR",
        help="with --detach: where the decay ends (default: a tenth of the session's rate)",
    )
    p.add_argument(
        "--restore-best",
        action="store_true",
        help="with --detach: end at the weights of the best validation loss (needs a "
        "validation split)",
    )

    add_job_commands(command)

    p = command(
        "set",
        cmd_set,
        "change a session's settings (during a training job: between two of its chunks)",
        "  rnnserve set shakespeare --learning-rate 1e-3\n"
        "  rnnserve set shakespeare --optimizer adagrad --learning-rate 0.05\n",
    )
    p.add_argument("id", metavar="ID")
    _add_setting_flags(p)

    p = command(
        "fork",
        cmd_fork,
        "copy a session under a new id, optionally with changed settings; prints the new id",
        "  rnnserve fork shakespeare shakespeare-lr1e-4 --learning-rate 1e-4\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("new_id", metavar="NEWID")
    _add_setting_flags(p)

    p = command(
        "export",
        cmd_export,
        "save a whole session (weights, optimizer, corpus, history) to an archive file, or "
        "with --weights-only its config, alphabet and weights",
        "  rnnserve export shakespeare -o model.rnn\n"
        "  rnnserve export shakespeare -o weights.rnn --weights-only   # docs/model-format.md\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", metavar="FILE", help="archive path (default: ID.rnn)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="only the config, alphabet and weights (no corpus, optimizer state or history); "
        "imports as a session at step 0 with no text",
    )

    p = command(
        "convert",
        cmd_convert,
        "convert an archive (whole or --weights-only) to an ONNX model, offline; needs "
        "pip install 'rnnserve[onnx]'",
        "  rnnserve convert model.rnn model.onnx    # inputs and outputs: docs/model-format.md\n",
    )
    p.add_argument("archive", metavar="ARCHIVE", help="an archive made by rnnserve export")
    p.add_argument(
        "output", nargs="?", metavar="OUTPUT", help="ONNX path (default: ARCHIVE with .onnx)"
    )

    p = command(
        "import",
        cmd_import,
        "make a session from an archive made by export; prints its id",
        "  rnnserve import model.rnn --id shakespeare-copy\n",
    )
    p.add_argument("file", metavar="FILE", help="archive path ('-' is stdin)")
    p.add_argument("--id", default="", help="the new session's id (default: the archive's)")

    p = command(
        "watch",
        cmd_watch,
        "follow sessions' loss live, whoever trains them (several: one line each)",
        "  rnnserve watch shakespeare\n"
        "  rnnserve watch shakespeare --from-step 1 --no-progress > loss.txt\n"
        "  rnnserve --json watch hallo --count 30\n"
        "  rnnserve watch small big --plot             # both curves on one live chart\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument(
        "--from-step",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="replay history from step N (default: only new updates)",
    )
    p.add_argument(
        "--count", type=_positive_int, metavar="N", help="stop after N points (of each session)"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print 'step loss' lines ('ID step loss' for several) instead of the status line",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="redraw the loss chart live (default --from-step 1: the whole history)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="redraw every S seconds (default 1)",
    )
    _add_chart_size_flags(p)

    p = command(
        "plot",
        cmd_plot,
        "sessions' loss history as a chart, an image or CSV; several: one line each",
        "  rnnserve plot shakespeare                       # a chart in the terminal\n"
        "  rnnserve plot shakespeare -o loss.png      # or .svg: pip install 'rnnserve[plot]'\n"
        "  rnnserve plot shakespeare --format csv > loss.csv   # step,loss,smoothed[,validation]\n"
        "  rnnserve plot small big -o compare.png   # each one's smoothed and validation loss\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write a .png or .svg image with matplotlib instead of drawing in the terminal",
    )
    p.add_argument(
        "--format",
        choices=["chart", "csv"],
        default="chart",
        help="chart (default) or csv: step,loss,smoothed[,validation] on stdout "
        "(several sessions: a session column first)",
    )
    p.add_argument(
        "--from-step",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start at step N (default 1)",
    )
    _add_chart_size_flags(p)

    p = command(
        "generate",
        cmd_generate,
        "sample text from a session, printed as it streams",
        "  rnnserve generate shakespeare --length 500\n"
        "  rnnserve generate shakespeare --prime 'ROMEO:' --temperature 0.7 --top-k 10 --seed 1\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--length", type=_positive_int, default=200, help="characters (default 200)")
    p.add_argument("--prime", default="", help="text that warms up the hidden state")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 greedy, <1 safer, >1 wilder (default 1)"
    )
    p.add_argument(
        "--top-k",
        type=_nonnegative_int,
        default=0,
        metavar="K",
        help="sample among the k likeliest",
    )
    p.add_argument("--seed", type=int, help="the same seed gives the same text")

    p = command(
        "predict",
        cmd_predict,
        "most likely next character at each position of a text, and the loss",
        "  rnnserve predict hallo Hallo          # predicted: alloH\n"
        "  rnnserve --json predict shakespeare --file test.txt\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("text", nargs="?", metavar="TEXT")
    p.add_argument("--file", help="read the text from a file ('-' is stdin)")

    p = command(
        "health",
        cmd_health,
        "check the server; exit 0 iff it is SERVING (a container HEALTHCHECK)",
        "  rnnserve health\n  rnnserve --timeout 3 health || echo down\n"
        "  rnnserve health --wait 30    # wait up to 30 s for the server to come up\n",
    )
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait until SERVING")

    p = command(
        "tensorboard",
        cmd_tensorboard,
        "write sessions as TensorBoard event files, one run directory each "
        "(pip install 'rnnserve[tensorboard]')",
        "  rnnserve tensorboard small big --logdir runs && tensorboard --logdir runs\n"
        "  rnnserve tensorboard shakespeare --logdir runs --follow   # live until Ctrl-C\n"
        "\nEach run has loss/train, loss/smoothed, loss/validation, speed/chars_per_second,\n"
        "text samples (tag sample) and the config as hyperparameters (the HPARAMS tab).\n"
        "A run directory (LOGDIR/ID) is rewritten from the session's history each time.\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument("--logdir", required=True, metavar="DIR", help="TensorBoard's log directory")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep appending the live points until Ctrl-C (or the sessions end)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="--follow: read the speed (and maybe take a sample) every S seconds (default 5)",
    )
    p.add_argument(
        "--sample-length",
        type=_nonnegative_int,
        default=200,
        metavar="N",
        help="characters per text sample (default 200; 0: no samples)",
    )
    p.add_argument(
        "--sample-every",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="--follow: a new sample once the session is N steps on (default 1000)",
    )
    p.add_argument(
        "--sample-temperature",
        type=float,
        default=0.8,
        metavar="T",
        help="temperature of the samples (default 0.8; 0 greedy); the seed is fixed",
    )
    p.add_argument("--sample-prime", default="", metavar="TEXT", help="start each sample with TEXT")

    p = command(
        "presets",
        cmd_presets,
        "what each preset is for, with its measured held-out loss and speed",
        "  rnnserve presets\n  rnnserve create input.txt --preset quality\n",
    )

    p = command(
        "completion",
        cmd_completion,
        "print the shell completion script (commands, flags, session ids)",
        '  eval "$(rnnserve completion bash)"     # add to ~/.bashrc\n'
        "  # zsh: autoload -U bashcompinit && bashcompinit, then the same\n",
    )
    p.add_argument("shell", choices=["bash"], help="only bash for now (zsh via bashcompinit)")
    return parser
