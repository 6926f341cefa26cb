"""`optimum-cli compress ...`: the compress CLI as an optimum-cli subcommand (optional extra
`compress[optimum]`). optimum-cli loads every module in the `optimum.commands.register` namespace;
this one stays light (compress loads only when the command runs) and hands the arguments to the
same Typer app as `compress`, so options, errors and exit codes are the same."""

from argparse import REMAINDER

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class CompressCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="compress", help="Quantize, prune, distill and measure models (compress)")

    @staticmethod
    def parse_args(parser):
        parser.add_argument("args", nargs=REMAINDER, help="a compress command and its options, e.g. quantize --help")

    def run(self):
        from compress.cli import main

        main(self.args.args or ["--help"], prog_name="optimum-cli compress")


REGISTER_COMMANDS = [CompressCommand]
