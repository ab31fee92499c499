"""Command line: `python convert/convert.py --hf-path SRC --mlx-path DST [-q] [--upload-repo ORG/NAME]`.

Converts a Gemma 4 unified checkpoint (or its MTP assistant) from the Hub or a local folder into an MLX folder,
optionally quantized, optionally uploaded. Without --hf-path it uploads an already converted --mlx-path. Flags share
mlx-lm's names. Errors are one stderr line and a non-zero exit.
"""

import argparse
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import the `convert` package from the repository root, not this file's folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from convert.pipeline import convert  # noqa: E402
from convert.quantize import BITS_CHOICES, GROUP_SIZE_CHOICES  # noqa: E402
from convert.recipes import RECIPES  # noqa: E402
from convert.upload import describe_upload, upload_folder  # noqa: E402
from mlx_gemma4.errors import Gemma4Error  # noqa: E402
from mlx_gemma4.loading import DTYPES  # noqa: E402

EXAMPLES = """examples:
  convert and quantize:        python convert/convert.py --hf-path google/gemma-4-12B-it --mlx-path gemma-4-12B-it-4bit -q
  upload a converted folder:   python convert/convert.py --mlx-path gemma-4-12B-it-4bit --upload-repo you/gemma-4-12B-it-4bit
  list what would be uploaded: add --dry-run to the upload"""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block on bad flags; a user needs only the reason."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python convert/convert.py", description="Convert Gemma 4 unified to MLX.",
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", "--model",
                        help="local folder or Hub repo id of the unquantized checkpoint to convert; leave it out to "
                        "upload an already converted --mlx-path")
    parser.add_argument("--mlx-path", default="mlx_model",
                        help="output folder, or without --hf-path the converted folder to upload (default: mlx_model)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize (default 4-bit, group size 64)")
    parser.add_argument("--q-bits", type=int, choices=BITS_CHOICES, help="bits per quantized weight")
    parser.add_argument("--q-group-size", type=int, choices=GROUP_SIZE_CHOICES, help="weights per scale and bias")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of unquantized tensors, scales and biases "
                        "(default: the checkpoint's)")
    parser.add_argument("--quant-predicate", choices=sorted(RECIPES), help="mixed-precision recipe")
    parser.add_argument("--qat", action="store_true", help="q4_0 QAT weights: map them exactly onto 4-bit, group 32")
    parser.add_argument("--upload-repo", help="Hub repo (ORG/NAME) to upload --mlx-path to: the result of this "
                        "conversion or, without --hf-path, the folder as it is")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded instead of uploading")
    parser.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    return parser


def run(args) -> int:
    if args.dry_run and not args.upload_repo:
        raise Gemma4Error("--dry-run lists what --upload-repo would upload; give --upload-repo")
    if args.hf_path is None and not args.upload_repo:
        raise Gemma4Error("give --hf-path to convert, or --upload-repo to upload an existing --mlx-path")
    folder = Path(args.mlx_path).expanduser()
    if args.hf_path is not None:
        convert(
            args.hf_path, args.mlx_path, quantize=args.quantize, q_bits=args.q_bits, q_group_size=args.q_group_size,
            dtype=args.dtype, quant_predicate=args.quant_predicate, qat=args.qat, force=args.force,
            run_name=args.upload_repo, progress=sys.stderr.isatty(),
        )
        print(f"wrote {folder}", file=sys.stderr)
    if args.upload_repo:
        if not folder.is_dir():
            raise Gemma4Error(f"nothing to upload: {folder} is not a folder")
        if args.dry_run:
            print(describe_upload(folder, args.upload_repo))
        else:
            print(f"uploaded to {upload_folder(folder, args.upload_repo)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    # A terminated run unwinds like Ctrl-C, so its staging folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Gemma4Error as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted (an unfinished conversion leaves the destination as it was)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
