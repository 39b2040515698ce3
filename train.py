"""Pretrain a byte-level PaLM on enwik8 (data/enwik8.gz) or, without it, the embedded corpus.

python train.py                       # CPU-sized defaults, ~10 minutes on 2 cores
python train.py --help                # every option
accelerate launch train.py --dim 512 --depth 8 --batch-size 64    # many GPUs, same code
"""

from palm_rlhf.options import parse_config
from palm_rlhf.train.pretrain import PretrainConfig, pretrain

if __name__ == "__main__":
    pretrain(parse_config(PretrainConfig, description=__doc__))
