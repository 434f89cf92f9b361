"""``lora-studio train CONFIG.toml``: the trainer's own command line (trainer.cli), run in this process."""

from __future__ import annotations

from trainer.cli import add_arguments, run


def register(sub) -> None:
    """Add ``train`` to the ``lora-studio`` subcommands, with the flags ``python -m trainer`` takes."""
    p = sub.add_parser("train", help="train a LoRA, DoRA, LoHa or LoKr adapter from a TOML config "
                                     "(datasets/*/train.toml are ready ones)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    return run(args)
