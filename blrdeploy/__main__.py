"""``python -m blrdeploy`` and the ``blrdeploy`` script."""

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # answered without loading the commands, which import torch (seconds)
        from blrdeploy.version import __version__  # deferred: the same lightness, for this one case

        print(f"blrdeploy {__version__}")
        return
    from blrdeploy.cli import main as run  # deferred: every command imports torch

    run()


if __name__ == "__main__":
    main()
