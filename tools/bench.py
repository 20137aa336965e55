"""The serving benchmark: jinfer against transformers on the same weights, side by side.

    python tools/bench.py [--model=PATH] [--batch_sizes=1,8,32,64] [--json=PATH]

Same flags as `jinfer bench` (it is that command).
"""

import sys

from absl import app

from jinfer import cli

if __name__ == "__main__":
    app.run(lambda argv: cli.main([argv[0], "bench", *argv[1:]]), argv=sys.argv)
