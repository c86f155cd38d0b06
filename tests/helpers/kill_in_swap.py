"""`python kill_in_swap.py MODE MANIFEST OUT`: run prepare and SIGKILL this process inside the output swap.

MODE renames: the two-rename swap, killed between its renames (the old output is out of place).
MODE exchange: the atomic exchange, killed right after it (the old output still sits in the staging folder);
exits 3 without preparing when the file system cannot exchange two folders.
"""

import os
import shutil
import signal
import sys

import leuko.data.swap as swap
from leuko.data.prepare import prepare


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, manifest: str, out: str) -> None:
    if mode == "renames":
        swap._exchange = lambda a, b: False
        rename, calls = os.rename, []

        def rename_then_die(src, dst):
            calls.append(src)
            if len(calls) == 2:  # the first moved the old output aside; the second would bring in the new
                _kill()
            rename(src, dst)

        os.rename = rename_then_die
    else:
        exchange = swap._exchange

        def exchange_then_die(a, b):
            if not exchange(a, b):
                sys.exit(3)
            shutil.rmtree = lambda *args, **kwargs: _kill()
            return True

        swap._exchange = exchange_then_die
    prepare(manifest, out, shape=(8, 8, 8), progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
