"""Converts an HF safetensors directory or a GGUF file to a jinfer Orbax checkpoint.

    python tools/convert_checkpoint.py --model=PATH --output=DIR [--dtype=bfloat16]
"""

import sys

from absl import app

from jinfer import cli

if __name__ == "__main__":
    app.run(lambda argv: cli.main([argv[0], "convert", *argv[1:]]), argv=sys.argv)
