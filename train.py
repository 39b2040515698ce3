"""Pretrain a byte-level PaLM on enwik8 (data/enwik8.gz) or, without it, the embedded corpus.

python train.py                       # CPU-sized defaults, ~10 minutes on 2 cores
python train.py --help                # every option
python train.py --resume latest       # continue after Ctrl-C (which saves a checkpoint)
accelerate launch train.py --dim 512 --depth 8 --batch-size 64    # many GPUs, same code
"""

import sys

from palm_rlhf.cli import DEBUG_HELP, run_command, run_pretrain
from palm_rlhf.options import config_from_args, config_parser
from palm_rlhf.train.pretrain import PretrainConfig

if __name__ == "__main__":
    parser = config_parser(PretrainConfig, description=__doc__)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args()
    config = config_from_args(parser, PretrainConfig, args)
    sys.exit(run_command("train.py", run_pretrain, config, args.debug))
