import re
from pathlib import Path

from setuptools import find_packages, setup

init_text = (Path(__file__).parent / "palm_rlhf" / "__init__.py").read_text()
version = {"__version__": re.search(r'__version__ = "([^"]+)"', init_text).group(1)}
# the oldest torch the code runs on; palm_rlhf/__init__.py refuses an older one at import
torch_floor = re.search(r'TORCH_FLOOR = "([^"]+)"', init_text).group(1)

setup(
    name="palm-rlhf",
    version=version["__version__"],
    description=(
        "PaLM + RLHF in pure PyTorch: pretraining, SFT, reward models, PPO, DPO, Chain of Hindsight"
    ),
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["palm_rlhf", "palm_rlhf.*"]),
    # the labelling page's HTML/CSS/JS, served from the installed package
    package_data={"palm_rlhf.label": ["static/*.html", "static/*.css", "static/*.js"]},
    python_requires=">=3.9",
    # Each floor is the oldest release the code needs, and `.ci/floors` proves every one of them
    # on each CI run: a venv with exactly these versions (">=" read as "==") runs a smoke test.
    #   torch 2.7        SDPA's enable_gqa (2.5); torch.distributed.fsdp.fully_shard and
    #                    FSDPModule as public names (2.6); fully_shard on CPU processes over
    #                    gloo (2.6 fails in its all-gather: 'Stream' has no 'record_event')
    #   accelerate 1.7   FullyShardedDataParallelPlugin(fsdp_version=2) came in 1.6, which
    #                    refuses state_dict_type="FULL_STATE_DICT" with it; 1.7 accepts it
    #   safetensors 0.4.3  accelerate requires it
    # The others are the oldest releases proven here, not a known break below them.
    install_requires=[
        f"torch>={torch_floor}",
        "einops>=0.7.0",
        "beartype>=0.16.0",
        "accelerate>=1.7.0",
        "tqdm>=4.64.1",
        "sentencepiece>=0.1.99",
        "safetensors>=0.4.3",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "ruff>=0.5",
            "starlette>=0.37",
            "uvicorn>=0.29",
            "httpx",
            "playwright",
            # tests/test_notebook.py executes examples/quickstart.ipynb in a python3 kernel
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel>=6",
            "matplotlib>=3.5",
            # --log-with tensorboard is tested end to end
            "tensorboard",
        ],
        "label": ["starlette>=0.37", "uvicorn>=0.29"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["palm-rlhf = palm_rlhf.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
    ],
)
